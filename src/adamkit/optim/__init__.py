"""The optimizers: one generic engine (``base``), one short module per algorithm."""

from .adafactor import Adafactor
from .adam import Adam, AdamW
from .adam_mini import AdamMini
from .ademamix import AdEMAMix
from .adopt import ADOPT
from .came import CAME
from .lamb import Lamb
from .lion import Lion
from .muon import Muon
from .schedule_free import ScheduleFreeAdamW
from .sophia import SophiaG
from .stable_adamw import StableAdamW

__all__ = [
    "ADOPT",
    "AdEMAMix",
    "Adafactor",
    "Adam",
    "AdamMini",
    "AdamW",
    "CAME",
    "Lamb",
    "Lion",
    "Muon",
    "ScheduleFreeAdamW",
    "SophiaG",
    "StableAdamW",
]
