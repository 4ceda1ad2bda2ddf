"""``adamkit.param_groups_weight_decay``: which parameters decay, and that the groups work as given."""

from __future__ import annotations

import torch
from torch import nn

import adamkit


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.tok.weight  # tied: one parameter, counted once


def _ids(group):
    return {id(p) for p in group["params"]}


def test_matrices_decay_biases_norms_and_frozen_do_not():
    m = _Tiny()
    decay, no_decay = adamkit.param_groups_weight_decay(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert _ids(decay) == {id(m.tok.weight), id(m.fc.weight)}
    assert _ids(no_decay) == {id(m.ln.weight), id(m.ln.bias), id(m.fc.bias)}
    assert len(decay["params"]) == 2  # the tied head is the embedding, listed once


def test_skip_by_module_or_parameter_name():
    m = _Tiny()
    decay, no_decay = adamkit.param_groups_weight_decay(m, 0.1, skip=["tok"])
    assert _ids(decay) == {id(m.fc.weight)} and id(m.tok.weight) in _ids(no_decay)
    (only,) = adamkit.param_groups_weight_decay(m, 0.1, skip=["tok.weight", "fc.weight"])
    assert only["weight_decay"] == 0.0  # no empty group is returned
    # a prefix that is not a whole module name skips nothing
    decay, _ = adamkit.param_groups_weight_decay(m, 0.1, skip=["to"])
    assert id(m.tok.weight) in _ids(decay)


def test_the_groups_decay_only_the_matrices_in_adamw():
    m = _Tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1.0)
    opt = adamkit.AdamW(adamkit.param_groups_weight_decay(m, 0.5), lr=0.1)
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(m.fc.weight, torch.full_like(m.fc.weight, 1 - 0.1 * 0.5))
    assert torch.equal(m.fc.bias, torch.ones_like(m.fc.bias))
    assert torch.equal(m.ln.weight, torch.ones_like(m.ln.weight))
