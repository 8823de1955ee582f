"""One optimizer step (all micro-batches of a global batch) on a DeepSpeed engine, PP or not."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.compat import device


@dataclass
class StepResult:
    loss: float  # mean over the global batch (all micro-batches, all DP ranks)
    grad_norm: float
    skipped: bool  # non-finite loss or gradient: the optimizer was not applied


def _to_device(batch: dict) -> dict:
    dev = device()
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def _all_ranks_finite(value: torch.Tensor) -> bool:
    """True only if `value` is finite on every rank, so that all ranks take the same decision."""
    bad = (~torch.isfinite(value.detach().float())).float().reshape(1).to(device())
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def _dp_mean(value: torch.Tensor) -> float:
    from megatron.core import parallel_state

    value = value.detach().float().reshape(1).to(device())
    if dist.is_initialized():
        group = parallel_state.get_data_parallel_group()
        dist.all_reduce(value, group=group)
        value /= dist.get_world_size(group)
    return value.item()


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def train_step(engine, micro_batches, loss_hook=None) -> StepResult:
    """Run one global batch. `micro_batches` yields dicts with tokens/labels/loss_mask ([b, s] each).

    A non-finite loss on any rank skips the step on all ranks: the remaining micro-batches still run forward
    (so every rank stays in its collectives) but nothing is backpropagated and the optimizer is not stepped;
    accumulated gradients are dropped. `loss_hook(loss) -> loss` lets tests inject faults.
    """
    if is_pipeline(engine):
        return _pipeline_step(engine, micro_batches)
    gas = engine.gradient_accumulation_steps()
    losses, grad_norm = [], None
    for m in range(gas):
        batch = _to_device(next(micro_batches))
        loss = engine(batch["tokens"], batch["labels"], batch["loss_mask"])
        if loss_hook is not None:
            loss = loss_hook(loss)
        if not _all_ranks_finite(loss):
            for _ in range(gas - m - 1):  # keep the data position exact: the step's batches are consumed
                next(micro_batches)
            _drop_gradients(engine, micro_steps_taken=m)
            return StepResult(loss=math.nan, grad_norm=math.nan, skipped=True)
        losses.append(loss.detach())
        engine.backward(loss)
        if m == gas - 1 and engine.zero_optimization_stage() == 0:
            grad_norm = _unsharded_grad_norm(engine)
        # DeepSpeed counts micro-steps in step(); it applies the optimizer only at the accumulation boundary.
        engine.step()
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else math.nan
    loss = _dp_mean(torch.stack(losses).mean())
    # DeepSpeed (bf16/fp32) clips with a non-finite norm rather than skipping; we can only report that.
    return StepResult(loss=loss, grad_norm=grad_norm, skipped=not math.isfinite(grad_norm))


def _unsharded_grad_norm(engine) -> float:
    """Global gradient norm without ZeRO (DeepSpeed reports none at stage 0): TP-split parameters count on
    every TP rank, replicated ones once. Call after the last backward of a step (gradients are DP-averaged)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    sq = torch.zeros(1, device=device())
    for p in engine.module.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            sq += p.grad.detach().float().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
    return sq.sqrt().item()


def _drop_gradients(engine, micro_steps_taken: int) -> None:
    """Forget the partial accumulation of a skipped step, and rewind DeepSpeed's micro-step counter so that
    the next step's accumulation boundary falls where it should."""
    engine.zero_grad()
    if hasattr(engine.optimizer, "zero_grad"):
        engine.optimizer.zero_grad(set_to_none=True)
    engine.micro_steps -= micro_steps_taken


def _pipeline_feed(micro_batches):
    """DeepSpeed's pipeline engine takes (inputs, labels) pairs; our labels travel as (labels, loss_mask)."""
    for b in micro_batches:
        yield b["tokens"], (b["labels"], b["loss_mask"])


def _pipeline_step(engine, micro_batches) -> StepResult:
    loss = engine.train_batch(data_iter=_pipeline_feed(micro_batches))
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else math.nan
    return StepResult(loss=float(loss), grad_norm=grad_norm, skipped=False)


@torch.no_grad()
def eval_loss(engine, micro_batches, num_micro_batches: int) -> float:
    """Mean loss over `num_micro_batches` micro-batches per DP rank, averaged over DP."""
    engine.eval()
    try:
        if is_pipeline(engine):
            it = _pipeline_feed(micro_batches)
            total, n = 0.0, 0
            # eval_batch consumes gradient_accumulation_steps micro-batches per call.
            for _ in range(max(1, num_micro_batches // engine.gradient_accumulation_steps())):
                total += float(engine.eval_batch(data_iter=it))
                n += 1
            return total / n
        losses = []
        for _ in range(num_micro_batches):
            batch = _to_device(next(micro_batches))
            losses.append(engine(batch["tokens"], batch["labels"], batch["loss_mask"]).detach().float())
        return _dp_mean(torch.stack(losses).mean())
    finally:
        engine.train()


class SkipCounter:
    """Non-finite steps, in a row and in total; `--max-skipped-steps` in a row stops the run (exit code 4)."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def update(self, result: StepResult) -> None:
        if result.skipped:
            self.in_a_row += 1
            self.total += 1
        else:
            self.in_a_row = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit
