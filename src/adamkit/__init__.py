"""adamkit: the Adam family of optimizers for PyTorch, faster and leaner, as drop-in replacements."""

from .adam import Adam, AdamW

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "__version__"]
