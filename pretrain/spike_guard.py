"""The loss-spike guard (--spike-sigma K --spike-window W): a step whose loss jumps above the recent window is not
applied.

Long runs die of loss spikes (issue 31): OLMo-core watches the loss (6 sigma over a 128-step window) and skips the
update; Megatron re-runs suspicious steps. Here, after a warm-up of W applied steps, a step whose loss exceeds the
mean of the last W applied losses by K standard deviations is skipped exactly as a non-finite step is
(pretrain/step.py): no parameter, Adam moment or step counter changes. The skip reuses that proven path rather
than a second one: the decision is taken at the step's last micro-batch, where the loss is computed (the last
pipeline stage), after the step's mean loss is all-reduced over data parallelism and before that micro-batch's
backward; a spike makes that backward's gradients NaN (the loss value stays as it was), so DeepSpeed's
non-finite check (an all-reduced gradient norm) drops the update on every rank, before any optimizer step.
`agree()` then tells every rank (the first pipeline stage computes no loss) that the skip was a spike.

Skipped losses do not enter the window; the window is saved in every checkpoint's meta.json
("trainer_state": {"spike_window": [...]}) and survives resume. --max-skipped-steps counts both kinds of skip.
"""
from __future__ import annotations

import collections
import statistics

import torch
import torch.distributed as dist


class NanGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward: the loss is logged as it was, the update is dropped."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class SpikeGuardError(ValueError):
    """--spike-sigma / --spike-window that cannot work, named with the fix."""


class SpikeGuard:
    def __init__(self, sigma: float, window: int, saved: list | None = None):
        if sigma <= 0 or window < 2:
            raise SpikeGuardError(f"--spike-sigma {sigma} --spike-window {window}: give sigma > 0 and a window of 2 or "
                             f"more steps")
        self.sigma, self.size = sigma, window
        self.window = collections.deque((saved or [])[-window:], maxlen=window)
        self.step, self._seen_step, self._losses, self.flagged = 0, None, [], None

    # ---------------------------------------------------------------- the decision, where the loss is computed
    def install(self, engine, grad_accum_steps: int) -> None:
        """Wrap the loss: the pipeline's loss_fn (last stage), or the whole model's output otherwise."""
        self.grad_accum = grad_accum_steps
        from pretrain.step import is_pipeline

        if is_pipeline(engine):
            loss_fn = engine.module.loss_fn
            engine.module.loss_fn = lambda outputs, labels: self._watch(loss_fn(outputs, labels),
                                                                        engine.module.training)
        else:
            engine.module.register_forward_hook(
                lambda module, inputs, output: self._watch(output, module.training) if output.dim() == 0 else output)

    def threshold(self) -> float | None:
        """The loss above which a step is a spike, or None during the warm-up."""
        if len(self.window) < self.size:
            return None
        return statistics.fmean(self.window) + self.sigma * statistics.pstdev(self.window)

    def _watch(self, loss, training: bool):
        if not training:
            return loss
        if self._seen_step != self.step:
            self._seen_step, self._losses, self.flagged = self.step, [], None
        self._losses.append(loss.detach().float())
        if len(self._losses) < self.grad_accum:
            return loss
        from pretrain.step import _dp_mean  # the step's reported loss, computed the same way

        value = _dp_mean(torch.stack(self._losses).mean())
        limit = self.threshold()
        if limit is not None and value > limit:  # (a non-finite loss is skipped as such, not as a spike)
            self.flagged = value
            return NanGradient.apply(loss)
        return loss

    # ---------------------------------------------------------------- every rank, after the step
    def begin(self, step: int) -> None:
        self.step, self.flagged = step, None

    def agree(self) -> bool:
        """Whether this step was skipped as a spike, on every rank (one small all-reduce)."""
        flag = torch.tensor([1.0 if self.flagged is not None else 0.0])
        if dist.is_initialized():
            from pretrain.compat import device

            flag = flag.to(device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def applied(self, loss: float) -> None:
        self.window.append(loss)

    def state(self) -> list[float]:
        return list(self.window)
