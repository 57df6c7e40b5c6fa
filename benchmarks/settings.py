"""What the quantizer benchmark measures: sizes, bit widths, and the noise threshold its report applies."""

FULL_SIZES = (1 << 16, 1 << 20, 1 << 22, 1 << 24)
QUICK_SIZES = (1 << 10, 1 << 12)
ACTIVATION_SHAPE = (128, 16, 32, 32)  # ResNet-20's first-stage activations at batch 128 (2^21 elements)
QUICK_ACTIVATION_SHAPE = (2, 4, 8, 8)
BITS = (2, 8)
TRAIN_BITS = 4
SAVED_NUMEL = 1 << 20
NOISY_SPREAD = 0.10  # per-round step ratios spread wider than this (IQR over median) mark the run as disturbed
