"""adamkit: the Adam family of optimizers for PyTorch, faster and leaner, as drop-in replacements."""

from .ddp import release_comm_hook
from .optim import (
    ADOPT,
    CAME,
    Adafactor,
    Adam,
    AdamMini,
    AdamW,
    AdEMAMix,
    Lamb,
    Lion,
    Muon,
    ScheduleFreeAdamW,
    SophiaG,
    StableAdamW,
)
from .param_groups import param_groups_weight_decay

__version__ = "0.1.0"
__all__ = [
    "ADOPT", "AdEMAMix", "CAME", "Adafactor", "Adam", "AdamMini", "AdamW", "Lamb", "Lion", "Muon",
    "ScheduleFreeAdamW", "SophiaG", "StableAdamW",
    "param_groups_weight_decay", "release_comm_hook", "__version__",
]  # fmt: skip
