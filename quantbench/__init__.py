"""quantbench: a benchmark for quantization-aware training. The quantizers live in the sibling package ``quantizers``."""

__version__ = "0.1.0"
