"""Tasks for ``adamkit train`` and ``adamkit race``: data and models (the optimizers, precisions and
state formats they combine are named in :mod:`adamkit.tools.registry`).

Everything here is deterministic given a seed, so that several optimizers can be trained from the
same initial weights on the same sequence of batches:

- :class:`CharTask`: a character-level GPT on the documentation text that every CPython install
  carries (``pydoc_data.topics``, ~465K characters, 103 distinct ones). No download.
- :class:`DigitsTask`: an MLP on scikit-learn's bundled ``load_digits`` (1,797 8x8 images); needs
  the optional ``adamkit[digits]`` extra.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]

# The validation set never depends on the run's seed: runs with different seeds are scored alike.
VAL_FRACTION = 0.1
VAL_BATCHES = 8  # CharTask's validation set: this many batches of evenly spaced held-out windows


# --------------------------------------------------------------------------------------------------
# Character-level corpus
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_corpus() -> str:
    """CPython's bundled documentation topics, joined in sorted-key order (deterministic)."""
    from pydoc_data import topics

    return "".join(topics.topics[key] for key in sorted(topics.topics))


@dataclass(frozen=True)
class CharCorpus:
    """A character vocabulary and the corpus encoded with it, split 90/10 into train/validation.

    The split is contiguous (the last 10% of the text is held out), so no validation window
    overlaps a training window. Codes are stored as uint8 (103 symbols) and widened per batch.
    """

    chars: tuple[str, ...]
    train: torch.Tensor
    val: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, codes: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in codes)


@functools.lru_cache(maxsize=1)
def char_corpus() -> CharCorpus:
    """The encoded corpus (built once per process: ~0.2 s)."""
    text = load_corpus()
    chars = tuple(sorted(set(text)))
    index = {c: i for i, c in enumerate(chars)}
    codes = torch.tensor(bytearray(index[c] for c in text), dtype=torch.uint8)
    n_train = int(len(codes) * (1 - VAL_FRACTION))
    return CharCorpus(chars=chars, train=codes[:n_train], val=codes[n_train:])


class WindowSampler:
    """Random (input, target) windows from a 1-D code tensor, driven by its own ``torch.Generator``.

    Seeded from the run's seed, it yields the same batches in the same order for every optimizer,
    and it never touches torch's global RNG.
    """

    def __init__(self, codes: torch.Tensor, batch_size: int, context: int, seed: int):
        if len(codes) <= context + 1:
            raise ValueError(f"context {context} is too long for a corpus of {len(codes)} characters")
        self.codes, self.batch_size, self.context = codes, batch_size, context
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(context + 1)

    def __call__(self) -> Batch:
        starts = torch.randint(len(self.codes) - self.context, (self.batch_size,), generator=self.generator)
        window = self.codes[starts[:, None] + self._offsets].long()
        return window[:, :-1], window[:, 1:]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self()


def fixed_windows(codes: torch.Tensor, n_batches: int, batch_size: int, context: int) -> list[Batch]:
    """``n_batches`` batches of windows evenly spaced over ``codes``: a fixed validation set."""
    n = n_batches * batch_size
    last = len(codes) - context - 1
    if last < 0:
        raise ValueError(f"context {context} is too long for a split of {len(codes)} characters")
    starts = torch.linspace(0, last, n).long()
    window = codes[starts[:, None] + torch.arange(context + 1)].long()
    return [(w[:, :-1], w[:, 1:]) for w in window.split(batch_size)]


# --------------------------------------------------------------------------------------------------
# A small GPT
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the GPT. The default has ~0.8M parameters (tied input/output embedding)."""

    vocab_size: int = 103
    context: int = 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, heads, T, C/heads)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A character-level GPT: token + learned position embeddings, pre-LN blocks, a linear head."""

    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok.weight
        # GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers) so
        # the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        if length > self.cfg.context:
            raise ValueError(f"sequence length {length} exceeds the model's context {self.cfg.context}")
        x = self.tok(idx) + self.pos.weight[:length]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@torch.no_grad()
def generate(
    model: GPT, corpus: CharCorpus, prompt: str, n: int, temperature: float = 0.8, seed: int = 0
) -> str:
    """``n`` characters sampled after ``prompt`` (softmax at ``temperature``, a seeded generator).

    Raises:
        ValueError: if the prompt has a character the corpus does not (the model has no code for it).
    """
    unknown = sorted(set(prompt) - set(corpus.chars))
    if unknown or not prompt:
        raise ValueError(
            f"the prompt must be non-empty text of the corpus's characters; not in it: {unknown}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    codes = corpus.encode(prompt)[None]
    try:
        for _ in range(n):
            logits = model(codes[:, -model.cfg.context :])[0, -1].float()
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)
            codes = torch.cat([codes, nxt[None]], dim=1)
    finally:
        model.train(was_training)
    return corpus.decode(codes[0, len(prompt) :])


# --------------------------------------------------------------------------------------------------
# Tasks: a model, a training sampler, a fixed validation set and a loss
# --------------------------------------------------------------------------------------------------


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with torch's RNG seeded, without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class CharTask:
    """Next-character prediction with :class:`GPT` on :func:`char_corpus`.

    The validation set is ``val_batches`` batches of windows evenly spaced over the held-out 10%.
    """

    name = "gpt"
    description = "character-level GPT on CPython's pydoc_data.topics"

    def __init__(self, model: GPTConfig = GPTConfig(), batch_size: int = 32, val_batches: int = VAL_BATCHES):
        if batch_size < 1 or val_batches < 1:
            raise ValueError(f"batch_size and val_batches must be >= 1, got {batch_size}, {val_batches}")
        self.corpus = char_corpus()
        if model.vocab_size != self.corpus.vocab_size:
            raise ValueError(
                f"GPTConfig.vocab_size is {model.vocab_size} but the corpus has {self.corpus.vocab_size}"
            )
        self.model_config, self.batch_size = model, batch_size
        self._val = fixed_windows(self.corpus.val, val_batches, batch_size, model.context)

    def build_model(self, seed: int) -> nn.Module:
        return _seeded(seed, lambda: GPT(self.model_config))

    def sampler(self, seed: int) -> Callable[[], Batch]:
        return WindowSampler(self.corpus.train, self.batch_size, self.model_config.context, seed)

    def val_batches(self) -> list[Batch]:
        return self._val

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        # The loss is taken in fp32 whatever the model's dtype (log-softmax over 103 classes in bf16
        # would lose ~2 digits).
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@dataclass(frozen=True)
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@functools.lru_cache(maxsize=1)
def digits_data() -> DigitsData:
    """scikit-learn's ``load_digits``, scaled to [0, 1], split 90/10 by a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the digits task needs scikit-learn: pip install 'adamkit[digits]' (or scikit-learn)"
        ) from err
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_train = int(len(x) * (1 - VAL_FRACTION))
    tr, va = perm[:n_train], perm[n_train:]
    return DigitsData(x[tr], y[tr], x[va], y[va])


class DigitsTask:
    """Classify scikit-learn's 8x8 digits with an MLP (64 -> hidden -> hidden -> 10, GELU)."""

    name = "digits"
    description = "MLP on scikit-learn's load_digits"

    def __init__(self, hidden: int = 128, batch_size: int = 64):
        if hidden < 1 or batch_size < 1:
            raise ValueError(f"hidden and batch_size must be >= 1, got {hidden}, {batch_size}")
        self.data = digits_data()
        self.hidden, self.batch_size = hidden, batch_size

    def build_model(self, seed: int) -> nn.Module:
        h = self.hidden
        return _seeded(
            seed,
            lambda: nn.Sequential(nn.Linear(64, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 10)),
        )

    def sampler(self, seed: int) -> Callable[[], Batch]:
        gen = torch.Generator().manual_seed(seed)
        x, y, n = self.data.x_train, self.data.y_train, len(self.data.x_train)

        def sample() -> Batch:
            i = torch.randint(n, (self.batch_size,), generator=gen)
            return x[i], y[i]

        return sample

    def val_batches(self) -> list[Batch]:
        return [(self.data.x_val, self.data.y_val)]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        dtype = next(model.parameters()).dtype
        return F.cross_entropy(model(x.to(dtype)).float(), y)
