"""Learning rate as a pure function of the iteration (so resume needs no scheduler state)."""
from __future__ import annotations

import math


def lr_at(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int, style: str,
          wsd_decay_fraction: float = 0.2) -> float:
    """`it` counts completed optimizer steps (the step being taken is it + 1)."""
    step = it + 1
    if warmup and step <= warmup:
        return lr * step / warmup
    if style == "constant":
        return lr
    if step >= decay_iters:
        return min_lr
    if style == "wsd":  # warmup-stable-decay: constant, then linear decay over the final fraction
        decay_start = decay_iters - int(wsd_decay_fraction * decay_iters)
        if step <= decay_start:
            return lr
        frac = (step - decay_start) / max(1, decay_iters - decay_start)
        return lr - (lr - min_lr) * frac
    frac = (step - warmup) / max(1, decay_iters - warmup)
    if style == "linear":
        return lr - (lr - min_lr) * frac
    if style == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))
    raise ValueError(f"--lr-decay-style {style!r}: use cosine, linear, constant or wsd")
