"""adamkit: the Adam family of optimizers for PyTorch, faster and leaner, as drop-in replacements."""

from .optim import Adam, AdamW, Lion
from .param_groups import param_groups_weight_decay

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "Lion", "param_groups_weight_decay", "__version__"]
