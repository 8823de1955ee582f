"""Activation memory as autograd sees it: bytes of tensors saved for backward during a forward pass.

On GPU, torch.cuda.max_memory_allocated is the figure to report; on CPU there is no allocator statistic, and
RSS is dominated by the allocator's caching. The bytes autograd keeps for backward are exactly what
activation checkpointing trades for recompute, so they are the honest measure on both.
"""
from __future__ import annotations

import contextlib

import torch


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward in forward passes inside `measure()`, summed
    over all of them (several micro-batches: each one's). Storages are told apart by address, so each is held
    until `measure()` ends: a micro-batch's activations are freed by its backward and the next micro-batch's
    reuse their addresses, which made the count of a 2-micro-batch step vary between runs (TP 2 + SP measured
    7.8% and above 8% less than TP 2 on different days, 2026-12-04)."""

    def __init__(self, model: torch.nn.Module):
        self._params = {p.data_ptr() for p in model.parameters() if p.numel() > 0}
        self._storages: dict[int, int] = {}
        self._held: list = []

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, t: torch.Tensor):
        if torch._C._current_graph_task_id() != -1:
            # Inside backward: activation checkpointing's recompute saves tensors that live only until their
            # own backward, and whose freed addresses get reused; counting them made "selective" look bigger
            # than "none" in some runs. Only what forward passes keep is the activation memory.
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._params and t.device.type != "meta" and ptr not in self._storages:
            self._storages[ptr] = storage.nbytes()
            self._held.append(storage)
        return t

    @contextlib.contextmanager
    def measure(self):
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            self._held.clear()


def peak_allocated_bytes(fn) -> int:
    """The most bytes allocated at once while fn() runs, above what was allocated before it. On GPU the CUDA
    allocator's own peak; on CPU, which keeps no allocator statistics, the profiler's allocation and free events
    (profile_memory) summed in time order: every tensor allocation counts, whether saved for backward or not."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


# ------------------------------------------------------------------------------ per-layer activation model
# The planner's activation estimate is a linear model in the layer's dimensions, with coefficients measured
# (not derived on paper) from this code base's own Block and head, because what autograd keeps depends on the
# kernels: e.g. an unfused RMSNorm keeps fp32 copies of its input. `fit_activation_model` re-measures them;
# tests check the stored CPU coefficients still match the code, and bench/activation_memory.py the CUDA ones.
LAYER_TERMS = ("h", "f", "q", "kv", "heads", "one")  # per token: hidden, ffn, a*d, g*d, a, 1
POSITION_TERMS = ("d",)  # per sequence position (b-independent): RoPE tables, d = head dim
HEAD_TERMS = ("h", "v", "one")  # final norm + output layer + loss, per token: hidden, vocab slice, 1

_LAYER_SHAPES = [  # (h, a, g, f, d, s, b): independent variations of every term
    (256, 4, 2, 704, 64, 128, 2), (256, 4, 4, 704, 64, 128, 2), (256, 8, 2, 704, 32, 128, 2),
    (384, 4, 2, 704, 96, 128, 2), (256, 4, 2, 1024, 64, 128, 2), (256, 4, 2, 704, 64, 64, 2),
    (256, 4, 2, 704, 64, 128, 4), (256, 2, 1, 704, 64, 128, 2), (256, 4, 2, 704, 32, 128, 2)]
_HEAD_SHAPES = [(256, 1024, 128, 2), (384, 1024, 128, 2), (256, 2048, 128, 2), (256, 1024, 64, 4)]  # h, v, s, b


def layer_saved_bytes(h, a, g, f, d, s, b, recompute, device, dtype=torch.bfloat16, experts: int = 0,
                      top_k: int = 2) -> int:
    """Bytes autograd keeps for one Block's backward (one TP rank with a/g/f its own slices); experts > 0: a
    mixture of experts' layer with `experts` experts of width f (megatron's parallel state must exist)."""
    from pretrain.config import ModelConfig
    from pretrain.model import Block, ModelOptions, transformer_config

    cfg = ModelConfig(num_layers=1, hidden_size=h, num_attention_heads=a, num_query_groups=g, ffn_hidden_size=f,
                      vocab_size=128, seq_length=s, num_experts=experts, moe_top_k=top_k)
    tconfig = transformer_config(cfg, 1, ModelOptions(recompute=recompute))
    tconfig.kv_channels = d  # a TP rank's slice: a/tp heads of the full head dim, the full hidden size
    block = Block(cfg, tconfig, 1, recompute)
    block.rotary = type(block.rotary)(kv_channels=d, rotary_percent=1.0, rotary_base=cfg.rope_theta,
                                      use_cpu_initialization=device.type == "cpu")
    block = block.to(device=device, dtype=dtype).train()
    x = torch.randn(s, b, h, dtype=dtype, device=device, requires_grad=True)
    meter = SavedActivations(block)
    with meter.measure():
        block(x)
    return meter.bytes


def head_saved_bytes(h, v, s, b, device, dtype=torch.bfloat16) -> int:
    """Bytes kept for backward by the final norm, the output layer (a TP rank's v columns) and the loss."""
    from pretrain.config import ModelConfig
    from pretrain.model import FinalNorm, OutputLayer, lm_loss, transformer_config

    cfg = ModelConfig(num_layers=1, hidden_size=h, num_attention_heads=4, vocab_size=v,
                      make_vocab_size_divisible_by=1, seq_length=s)
    tconfig = transformer_config(cfg, 1)
    norm = FinalNorm(cfg, tconfig).to(device=device, dtype=dtype)
    out = OutputLayer(cfg, tconfig).to(device=device, dtype=dtype)
    x = torch.randn(s, b, h, dtype=dtype, device=device, requires_grad=True)
    labels = torch.randint(0, v, (b, s), device=device)
    meter = SavedActivations(torch.nn.ModuleList([norm, out]))
    with meter.measure():
        lm_loss(out(norm(x)), labels, torch.ones(b, s, device=device))
    return meter.bytes


def head_peak_bytes(cfg, chunks: int, dtype=torch.float32, device=None) -> int:
    """Peak bytes allocated by the output layer and loss (forward and backward) of one [seq, 1, hidden] sample,
    plain (chunks 1) or chunked (pretrain/chunked_loss.py). Needs torch.distributed and megatron's parallel state
    (TP 1) set up."""
    from pretrain.model import OutputLayer, head_loss, transformer_config

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    head = OutputLayer(cfg, transformer_config(cfg, 1), loss_chunks=chunks).to(device=device, dtype=dtype)
    torch.nn.init.normal_(head.output_layer.weight, std=0.02)
    hidden = torch.randn(cfg.seq_length, 1, cfg.hidden_size, dtype=dtype, device=device, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (1, cfg.seq_length), device=device)
    mask = torch.ones(1, cfg.seq_length, device=device)
    return peak_allocated_bytes(lambda: head_loss(head, hidden, labels, mask, None, chunks).backward())


def _lstsq(rows, cols) -> dict:
    import numpy as np

    coef, *_ = np.linalg.lstsq(np.array([r[0] for r in rows], float), np.array([r[1] for r in rows], float),
                               rcond=None)
    return {c: round(float(x), 3) for c, x in zip(cols, coef)}


def fit_activation_model(device: torch.device | None = None) -> dict:
    """Measure saved bytes over shapes that vary each dimension and fit the per-token / per-position terms."""
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    out = {}
    for mode in ("none", "selective", "full"):
        rows = []
        for h, a, g, f, d, s, b in _LAYER_SHAPES:
            t = s * b
            rows.append(([t * h, t * f, t * a * d, t * g * d, t * a, t, s * d],
                         layer_saved_bytes(h, a, g, f, d, s, b, mode, device)))
        out[mode] = _lstsq(rows, [f"token_{k}" for k in LAYER_TERMS] + [f"position_{k}" for k in POSITION_TERMS])
    rows = [([s * b * h, s * b * v, s * b], head_saved_bytes(h, v, s, b, device)) for h, v, s, b in _HEAD_SHAPES]
    out["head"] = _lstsq(rows, [f"token_{k}" for k in HEAD_TERMS])
    return out
