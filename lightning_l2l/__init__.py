"""lightning_l2l: learning to learn by gradient descent by gradient descent, for PyTorch Lightning."""

__version__ = "0.1.0"
