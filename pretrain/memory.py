"""Activation memory as autograd sees it: bytes of tensors saved for backward during a forward pass.

On GPU, torch.cuda.max_memory_allocated is the figure to report; on CPU there is no allocator statistic, and
RSS is dominated by the allocator's caching. The bytes autograd keeps for backward are exactly what
activation checkpointing trades for recompute, so they are the honest measure on both.
"""
from __future__ import annotations

import contextlib

import torch


class SavedActivations:
    def __init__(self, model: torch.nn.Module):
        self._params = {p.data_ptr() for p in model.parameters() if p.numel() > 0}
        self._storages: dict[int, int] = {}

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._params and t.device.type != "meta":
            self._storages[ptr] = t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def measure(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self
