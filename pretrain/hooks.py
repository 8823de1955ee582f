"""Fault injection and inspection for the test suite, kept out of the training loop. Each is switched on by an
environment variable, and a run with any of them on says so loudly on its first lines (and in its run config):
a stray variable must never make a healthy run look divergent.

PRETRAIN_INJECT_NAN_AT=3,4       the loss of steps 3 and 4 becomes NaN (so do its gradients)
PRETRAIN_INJECT_NAN_GRAD_AT=5    step 5's loss stays finite but its gradients are NaN
PRETRAIN_INJECT_SPIKE_AT=7       step 7's final-norm output is scaled 30x: a finite loss an order of magnitude up
PRETRAIN_INJECT_RANK=1           inject on this global rank only (default: every rank)
PRETRAIN_DUMP_LOGITS=FILE        at the end, the full-vocabulary logits of the first micro-batch go to FILE
PRETRAIN_SLOW_RANK=1:0.3         global rank 1 sleeps 0.3 s in every training forward pass (a straggler)
PRETRAIN_STALL_AT=1:4:20         global rank 1 sleeps 20 s in the first forward pass of step 4 (a stall)
PRETRAIN_SLOW_SAVE=3:30          a checkpoint save at iteration 3 or later sleeps 30 s on every rank after writing
                                 its file, before the tag is complete (a save longer than the grace before SIGKILL)
PRETRAIN_SAVE_MBPS=200           writing a checkpoint file takes at least its size / 200 MB/s (a slow filesystem:
                                 bench/async_save.py)
"""
from __future__ import annotations

import os
import time

import torch

from pretrain.parallel import log, rank
from pretrain.spike_guard import NanGradient

VARIABLES = ("PRETRAIN_INJECT_NAN_AT", "PRETRAIN_INJECT_NAN_GRAD_AT", "PRETRAIN_INJECT_SPIKE_AT",
             "PRETRAIN_INJECT_RANK", "PRETRAIN_DUMP_LOGITS", "PRETRAIN_SLOW_RANK", "PRETRAIN_STALL_AT",
             "PRETRAIN_SLOW_SAVE", "PRETRAIN_SAVE_MBPS")


def _steps(value: str) -> set[int]:
    return {int(s) for s in value.split(",") if s.strip()}


class TestHooks:
    """Poisons the final norm's output (present on the last pipeline stage and in every non-pipeline model) in
    the steps asked for: that reaches the loss of every layout, pipeline included."""

    def __init__(self, env=os.environ):
        self.active = {k: env[k] for k in VARIABLES if env.get(k)}
        self.nan_steps = _steps(env.get("PRETRAIN_INJECT_NAN_AT", ""))
        self.nan_grad_steps = _steps(env.get("PRETRAIN_INJECT_NAN_GRAD_AT", ""))
        self.spike_steps = _steps(env.get("PRETRAIN_INJECT_SPIKE_AT", ""))
        only = env.get("PRETRAIN_INJECT_RANK")
        self.ranks = None if not only else {int(only)}
        self.dump_logits_path = env.get("PRETRAIN_DUMP_LOGITS") or None
        slow = env.get("PRETRAIN_SLOW_RANK", "").split(":")
        self.slow = (int(slow[0]), float(slow[1])) if len(slow) == 2 else None
        stall = env.get("PRETRAIN_STALL_AT", "").split(":")
        self.stall = (int(stall[0]), int(stall[1]), float(stall[2])) if len(stall) == 3 else None
        slow_save = env.get("PRETRAIN_SLOW_SAVE", "").split(":")
        self.slow_save = (int(slow_save[0]), float(slow_save[1])) if len(slow_save) == 2 else None
        self.save_mbps = float(env["PRETRAIN_SAVE_MBPS"]) if env.get("PRETRAIN_SAVE_MBPS") else None
        self.step = 0  # the step being taken (1-based); set by the loop

    def announce(self) -> None:
        if self.active:
            log("WARNING: test hooks are active (" + ", ".join(f"{k}={v}" for k, v in self.active.items()) +
                "); this run injects faults on purpose. Unset these variables for real training.")

    def install(self, engine) -> None:
        if self.slow_save:
            _slow_down_saves(*self.slow_save)
        if self.save_mbps:
            _throttle_saves(self.save_mbps)
        if self.slow or self.stall:
            engine.module.register_forward_pre_hook(self._sleep)
        if self.nan_steps or self.nan_grad_steps or self.spike_steps:
            install_poison(engine, lambda: (self.step, "loss" if self.step in self.nan_steps else
                                            "grad" if self.step in self.nan_grad_steps else
                                            "spike" if self.step in self.spike_steps else None), self.ranks)

    def _sleep(self, module, inputs):
        """PRETRAIN_SLOW_RANK / PRETRAIN_STALL_AT: this rank's own work takes longer (not a collective)."""
        if not module.training:
            return
        if self.slow and rank() == self.slow[0]:
            time.sleep(self.slow[1])
        if self.stall and rank() == self.stall[0] and self.step == self.stall[1] and self._stalled != self.step:
            self._stalled = self.step
            _stall_here(self.stall[2])

    _stalled = None


def _slow_down_saves(from_iteration: int, seconds: float) -> None:
    """PRETRAIN_SLOW_SAVE: every rank's file is written, then the save waits before meta.json, `complete` and
    `latest` (checkpoint.save's commit)."""
    from pretrain import checkpoint

    write = checkpoint.write_snapshot

    def slow_write(tag_dir, snap):
        entry = write(tag_dir, snap)
        if int(os.path.basename(tag_dir).split("_")[1]) >= from_iteration:
            time.sleep(seconds)
        return entry

    checkpoint.write_snapshot = slow_write


def _throttle_saves(mbps: float) -> None:
    """PRETRAIN_SAVE_MBPS: a rank's file takes at least its size at this bandwidth to write."""
    from pretrain import checkpoint

    write = checkpoint.write_snapshot

    def throttled(tag_dir, snap):
        t0 = time.time()
        entry = write(tag_dir, snap)
        time.sleep(max(0.0, snap.bytes / (mbps * 1e6) - (time.time() - t0)))
        return entry

    checkpoint.write_snapshot = throttled


def _stall_here(seconds: float) -> None:
    """A named frame for the watchdog's stack dump to show."""
    time.sleep(seconds)


def install_poison(engine, now, ranks=None, micro_batch=None) -> None:
    """Forward hook on the final norm. `now()` -> (step, mode): while training, mode "loss" makes the output NaN,
    "grad" keeps it finite but makes its gradient NaN, "spike" scales it 30x, None does nothing; on `ranks` only
    (None: all), and in
    the `micro_batch`-th forward pass of the step only (None: every one)."""
    from pretrain.model import FinalNorm

    seen = {"step": None, "calls": 0}

    def hook(module, inputs, output):
        step, mode = now()
        if not module.training:
            return output
        seen["calls"] = seen["calls"] + 1 if seen["step"] == step else 0
        seen["step"] = step
        if mode is None or (ranks is not None and rank() not in ranks) or \
                (micro_batch is not None and seen["calls"] != micro_batch):
            return output
        if mode == "spike":
            return output * 30.0
        return output * float("nan") if mode == "loss" else NanGradient.apply(output)

    for m in engine.module.modules():
        if isinstance(m, FinalNorm):
            m.register_forward_hook(hook)


@torch.no_grad()
def full_logits(engine, batch: dict):
    """Full-vocabulary logits [b, s, vocab] of one micro-batch (the tokenizer's vocabulary: the padding columns,
    -inf, are dropped), on the ranks that hold the output layer (the last pipeline stage); None elsewhere."""
    from megatron.core import tensor_parallel

    from pretrain import context_parallel
    from pretrain.step import local_logits

    logits = local_logits(engine, batch)
    if logits is None:
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits.float().contiguous())
    logits = context_parallel.gather(logits, 0)  # every CP rank's chunk of the sequence
    vocab = next(m.vocab_size for m in engine.module.modules() if hasattr(m, "padded_vocab_size"))
    return logits.transpose(0, 1)[..., :vocab].cpu()


def dump_logits(engine, dataset, micro_batch_size: int, path: str) -> None:
    """Full-vocabulary logits of the trained model on the first micro-batch of `dataset`, for comparison with an
    exported model."""
    from megatron.core import parallel_state

    from pretrain.data import micro_batches

    batch = next(micro_batches(dataset, 0, micro_batch_size, 0, 1, num_workers=0))
    logits = full_logits(engine, batch)
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and \
            parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        torch.save({"tokens": batch["tokens"], "logits": logits}, path)
