"""The one error class of the quantizers package."""


class QuantizerError(ValueError):
    """Bad input to a quantizer or the registry: the message is one line that names the fix."""
