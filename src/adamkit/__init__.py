"""adamkit: the Adam family of optimizers for PyTorch, faster and leaner, as drop-in replacements."""

from .adam import Adam, AdamW
from .param_groups import param_groups_weight_decay as param_groups_weight_decay  # re-export

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "__version__"]
