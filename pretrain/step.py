"""One optimizer step (all micro-batches of a global batch) on a DeepSpeed engine, PP or not, and what a
non-finite step does.

A step whose loss or gradients are not finite on any rank is skipped on every rank, for real: no parameter and
no optimizer state changes, Adam's step counter does not advance, the accumulated gradients are dropped, and the
step's batches count as consumed. The decision is taken where the gradients are complete, after the last
backward of the step and before the update: DeepSpeed's ZeRO-1/2/3 and bf16 optimizers compute the global
gradient norm (all-reduced over every rank) first and skip the update when it is not finite
(docs/FINDINGS.md, "DeepSpeed on CPU"); for the one optimizer DeepSpeed leaves unchecked (fp32 ZeRO-0: our
AdamW as it is), `guard_plain_optimizer` adds the same check. The engine then reports `was_step_applied()`,
which is what a step's `skipped` says. A NaN loss needs no special path: its gradients are NaN.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pretrain.compat import device


@dataclass
class StepResult:
    loss: float  # mean over the global batch (all micro-batches, all DP ranks); may be nan when skipped
    grad_norm: float
    skipped: bool  # non-finite loss or gradient somewhere: nothing was updated
    extra: dict = field(default_factory=dict)  # a mixture of experts' routing figures (pretrain.moe.RoutingStats)


def _to_device(batch: dict) -> dict:
    dev = device()
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def _dp_mean(value: torch.Tensor) -> float:
    from megatron.core import parallel_state

    value = value.detach().float().reshape(1).to(device())
    if dist.is_initialized():  # context-parallel ranks each hold a share of the loss (pretrain/context_parallel.py)
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(value, group=group)
        value /= dist.get_world_size(group)
    return value.item()


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def global_loss_tokens(micro_batches, count: int) -> list[dict]:
    """The next `count` micro-batches of this rank, each with "loss_tokens": the loss tokens of all of them on every
    DP rank, divided by count x DP. Each micro-batch's loss is then its sum over loss tokens divided by that, and
    the mean DeepSpeed takes over micro-batches (its 1/accumulation scaling) and DP ranks (gradient averaging) is
    the sum over every loss token of the global batch divided by their number: the same step under any DP,
    micro-batch size and accumulation, where a mean of per-micro-batch means weighs a token by how few others
    share its micro-batch (objectives whose samples supervise different numbers of tokens: pretrain/objectives.py).
    One all-reduce of one number over DP, before the step."""
    from megatron.core import parallel_state

    batches = [next(micro_batches) for _ in range(count)]
    total = torch.stack([b["loss_mask"].float().sum() for b in batches]).sum().reshape(1).to(device())
    dp = 1
    if dist.is_initialized():
        group = parallel_state.get_data_parallel_group()
        dist.all_reduce(total, group=group)
        dp = dist.get_world_size(group)
    per_micro = (total / (count * dp)).clamp(min=1e-12).cpu()  # no loss token anywhere: the sum is 0, not nan
    return [{**b, "loss_tokens": per_micro} for b in batches]


def train_step(engine, micro_batches, global_tokens: bool = False) -> StepResult:
    """Run one global batch. `micro_batches` yields dicts with tokens/labels/loss_mask ([b, s] each).
    global_tokens: the loss is divided by the global batch's loss tokens (global_loss_tokens), not averaged over
    micro-batches."""
    if global_tokens:
        micro_batches = iter(global_loss_tokens(micro_batches, engine.gradient_accumulation_steps()))
    if is_pipeline(engine):
        return _pipeline_step(engine, micro_batches)
    losses, grad_norm = [], None
    last = engine.gradient_accumulation_steps() - 1
    exchange = getattr(engine, "zero3_step", None)  # ZeRO-3: one gather and one reduce per step (zero3_step.py)
    with exchange.step() if exchange else contextlib.nullcontext():
        for m in range(last + 1):
            batch = _to_device(next(micro_batches))
            if exchange:
                exchange.micro_batch(m)
            loss = engine(batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("loss_tokens"),
                          batch.get("document_ids"))
            losses.append(loss.detach())
            engine.backward(loss)
            if m == last and exchange:
                exchange.flush()
            if m == last and engine.zero_optimization_stage() == 0:
                grad_norm = _unsharded_grad_norm(engine)
            # DeepSpeed counts micro-steps in step(); it applies the optimizer only at the accumulation boundary.
            engine.step()
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    return _result(engine, _dp_mean(torch.stack(losses).float().mean()), grad_norm)


def _result(engine, loss: float, grad_norm) -> StepResult:
    skipped = not engine.was_step_applied()
    grad_norm = float(grad_norm) if grad_norm is not None else math.nan
    stats = getattr(engine, "moe_stats", None)
    extra = stats.step_metrics(engine.gradient_accumulation_steps()) if stats else {}
    return StepResult(loss=loss, grad_norm=math.nan if skipped else grad_norm, skipped=skipped, extra=extra)


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


def guard_plain_optimizer(engine) -> None:
    """fp32 ZeRO-0 runs our AdamW as it is, and DeepSpeed clips and applies a non-finite gradient. Give it the
    check DeepSpeed's own optimizers have: every rank's gradients finite (all-reduced), else no update, gradients
    dropped, `overflow` set (which the engine turns into was_step_applied() == False)."""
    opt = engine.optimizer
    if not isinstance(opt, torch.optim.Optimizer) or getattr(opt, "_finite_guard", False):
        return
    step = opt.step

    def guarded_step(*args, **kwargs):
        bad = torch.zeros(1, device=device())
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    bad += (~torch.isfinite(p.grad)).any().float()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        opt.overflow = bool(bad.item())
        if opt.overflow:
            opt.zero_grad(set_to_none=True)
            return None
        return step(*args, **kwargs)

    opt.step, opt.overflow, opt._finite_guard = guarded_step, False, True


def _pipeline_feed(micro_batches):
    """DeepSpeed's pipeline engine takes (inputs, labels) pairs; our labels travel as (labels, loss_mask) and, with
    global_loss_tokens, loss_tokens as a third; inputs are the tokens, or (tokens, document ids) when the data gives
    them (--objective sft)."""
    for b in micro_batches:
        extra = (b["loss_tokens"].reshape(1),) if "loss_tokens" in b else ()
        inputs = (b["tokens"], b["document_ids"]) if "document_ids" in b else b["tokens"]
        yield inputs, (b["labels"], b["loss_mask"], *extra)


def _pipeline_step(engine, micro_batches) -> StepResult:
    loss = engine.train_batch(data_iter=_pipeline_feed(micro_batches))
    return _result(engine, float(loss), engine.get_global_grad_norm())


@torch.no_grad()
def evaluate(engine, micro_batches, num_micro_batches: int, global_tokens: bool = False) -> dict:
    """{"loss": mean loss over `num_micro_batches` micro-batches per DP rank, averaged over DP (global_tokens: over
    every loss token of them, as training divides); "accuracy": top-1 accuracy over every loss-counted token of
    them (pretrain.model.TokenAccuracy)}."""
    from pretrain.model import ACCURACY

    if global_tokens:
        micro_batches = iter(global_loss_tokens(micro_batches, num_micro_batches))
    engine.eval()
    try:
        with ACCURACY.counting():
            loss = _eval_loss(engine, micro_batches, num_micro_batches)
        return {"loss": loss, "accuracy": ACCURACY.result}
    finally:
        engine.train()


def _eval_loss(engine, micro_batches, num_micro_batches: int) -> float:
    if is_pipeline(engine):
        it = _pipeline_feed(micro_batches)
        total, n = 0.0, 0
        # (global_loss_tokens divided by every micro-batch requested: the calls below must consume them all)
        assert num_micro_batches % engine.gradient_accumulation_steps() == 0, \
            (num_micro_batches, engine.gradient_accumulation_steps())
        # eval_batch consumes gradient_accumulation_steps micro-batches per call.
        for _ in range(max(1, num_micro_batches // engine.gradient_accumulation_steps())):
            total += float(engine.eval_batch(data_iter=it))
            n += 1
        return total / n
    losses = []
    for _ in range(num_micro_batches):
        batch = _to_device(next(micro_batches))
        losses.append(engine(batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("loss_tokens"),
                             batch.get("document_ids")).detach().float())
    return _dp_mean(torch.stack(losses).mean())


@torch.no_grad()
def local_logits(engine, batch: dict):
    """This TP rank's slice of the logits [s, b, v/tp] of one micro-batch (tokens, and for the pipeline engine
    labels and loss_mask of the same shape as training's), in eval mode, on the ranks that hold the output layer
    (the last pipeline stage); None elsewhere. Every rank of the model must call it together."""
    engine.eval()
    try:
        if not is_pipeline(engine):
            doc = batch.get("document_ids")
            return engine(batch["tokens"].to(device()), document_ids=None if doc is None else doc.to(device()))
        # megatron's vocab-parallel cross-entropy turns fp32 logits into probabilities in place, and the engine
        # hands back the tensor the loss saw: let the loss see a copy. (With --loss-chunks the last stage returns
        # the hidden states, which PipelineLoss.logits projects.)
        loss_fn = engine.module.loss_fn
        engine.module.loss_fn = lambda logits, labels: loss_fn(logits.clone(), labels)
        try:
            _, outputs = engine.eval_batch(data_iter=_pipeline_feed(iter([batch])), return_logits=True,
                                           num_micro_batches=1)
        finally:
            engine.module.loss_fn = loss_fn
        return engine.module.pipeline_loss.logits(outputs) if engine.is_last_stage() else None
    finally:
        engine.train()


def release_gathered(engine) -> None:
    """After evaluation, sampling or a logits dump: ZeRO-3 keeps what forwards without a backward gathered (no
    backward comes to release it), and the next training step then holds more at once than any other step (16-layer
    tiny model, DP 2: 200,704 elements gathered at its forward's end against 106,496 in every other step;
    docs/FINDINGS.md). Releasing it once afterwards (not per forward: evaluation's forwards reuse it) restores the
    steady state (at the cost of one more gather of the persistent parameters, the norms, which it releases too:
    tests/pretrain/test_steptime.py counts their bytes in the next step). Nothing to do for other stages."""
    if engine.zero_optimization_partition_weights():
        engine.empty_partition_cache()


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
