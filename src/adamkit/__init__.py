"""adamkit: the Adam family of optimizers for PyTorch, faster and leaner, as drop-in replacements."""

from .optim import Adam, AdamW, Lion

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "Lion", "__version__"]
