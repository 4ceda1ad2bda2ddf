"""The optimizers: one generic engine (``base``), one short module per algorithm."""

from .adam import Adam, AdamW
from .lion import Lion

__all__ = ["Adam", "AdamW", "Lion"]
