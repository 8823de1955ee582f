"""Knowing when to stop: early stopping on a validation metric, and the best checkpoint kept by name.

Why by hand: none of the anchors (Megatron, torchtitan, OLMo-core, GPT-NeoX, litgpt) has early stopping or keeps
the best checkpoint (issue 31); the semantics follow Lightning's EarlyStopping, which users know:
  - patience counts evaluations since the metric last beat its reference by more than --early-stop-min-delta
    (the reference moves only on such an improvement, so a slow creep below min_delta still runs out patience);
  - the best value is tracked strictly (any improvement): --keep-best saves that checkpoint and names it in
    <save>/best, whatever min_delta says.
The whole state lives in every checkpoint's meta.json ("trainer_state": {"early_stop": ...}), so a resumed run
counts on from the checkpoint's evaluation: SIGKILL and rerun stop at the step an uninterrupted run stops at, and a
run that stopped early, resubmitted (Slurm requeue), finds its own verdict there and exits at once.

Every rank takes rank 0's values (lm-eval hands task results to LOCAL_RANK 0 only, pretrain/downstream.py), so
all ranks agree on the verdict and stop at the same step; nobody is left waiting in a collective.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.distributed as dist

# The direction of a metric, by the end of its name: ours (val_loss, val_ppl, val_accuracy) and lm-eval's
# (val_<task>_acc, _acc_norm, _exact_match, _f1, _mcc, _perplexity, _word_perplexity, _bits_per_byte, ...).
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "bits_per_byte", "bpb")
HIGHER_IS_BETTER = ("accuracy", "acc", "acc_norm", "exact_match", "em", "f1", "mcc", "bleu", "rouge")


class EarlyStopError(ValueError):
    """A misuse of the early-stopping options, named with its fix."""


def direction(metric: str, mode: str = "auto") -> str:
    """'min' or 'max' for `metric`; `mode` other than auto wins."""
    if mode in ("min", "max"):
        return mode
    tail = metric.split("_")
    for n in range(len(tail), 0, -1):  # the longest known ending: val_x_acc_norm is acc_norm, not norm
        end = "_".join(tail[-n:])
        if end in LOWER_IS_BETTER:
            return "min"
        if end in HIGHER_IS_BETTER:
            return "max"
    raise EarlyStopError(f"--early-stop-metric {metric}: cannot tell whether higher or lower is better; pass "
                         f"--early-stop-mode max or --early-stop-mode min")


def check_options(args) -> None:
    """Before anything is built: the flags fit together."""
    if args.early_stop_patience is None and not args.keep_best:
        return
    flag = "--keep-best" if args.early_stop_patience is None else "--early-stop-patience"
    if not args.eval_interval:
        raise EarlyStopError(f"{flag} needs evaluations: pass --eval-interval N (N > 0)")
    if args.keep_best and not args.save:
        raise EarlyStopError("--keep-best saves the best checkpoint: pass --save DIR")
    if args.early_stop_patience is not None and args.early_stop_patience < 1:
        raise EarlyStopError(f"--early-stop-patience {args.early_stop_patience}: give 1 or more evaluations")
    if args.early_stop_min_delta < 0:
        raise EarlyStopError(f"--early-stop-min-delta {args.early_stop_min_delta}: give 0 or more")
    metric = args.early_stop_metric
    if not metric.startswith("val_"):
        raise EarlyStopError(f"--early-stop-metric {metric}: a validation scalar (val_loss, val_ppl, val_accuracy, "
                             f"or val_<task>_<metric> from --eval-tasks)")
    if metric not in ("val_loss", "val_ppl", "val_accuracy"):
        tasks = args.eval_tasks or []
        if not any(metric.startswith(f"val_{t}_") for t in tasks):
            raise EarlyStopError(f"--early-stop-metric {metric} is no metric this run logs: pass --eval-tasks with "
                                 f"its task, or use val_loss / val_ppl / val_accuracy")
    direction(metric, args.early_stop_mode)


@dataclass
class Verdict:
    value: float
    improved: bool  # a new best (strictly): --keep-best saves it
    stop: bool


@dataclass
class EarlyStopping:
    metric: str
    mode: str  # min or max
    patience: int | None  # None: keep-best only, never stops
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    reference: float | None = None  # what patience compares against (moves on a > min_delta improvement)
    since: int = 0  # evaluations since the reference last moved
    last_step: int | None = None  # the step of the last evaluation counted, and its value: a checkpoint saved
    last_value: float | None = None  # at that step knows its own value (the fallback when <save>/best is damaged)

    @classmethod
    def from_args(cls, args, saved: dict | None) -> "EarlyStopping | None":
        """The run's state: the checkpoint's when it watched the same metric the same way, else fresh."""
        if args.early_stop_patience is None and not args.keep_best:
            return None
        mode = direction(args.early_stop_metric, args.early_stop_mode)
        state = cls(args.early_stop_metric, mode, args.early_stop_patience, args.early_stop_min_delta)
        if saved and saved.get("metric") == state.metric and saved.get("mode") == mode:
            for key in ("best", "best_step", "reference", "since", "last_step", "last_value"):
                setattr(state, key, saved.get(key))
        return state

    def state_dict(self) -> dict:
        return asdict(self)

    def _better(self, value: float, than: float | None, delta: float) -> bool:
        if than is None:
            return True
        return value < than - delta if self.mode == "min" else value > than + delta

    def update(self, values: dict, step: int) -> Verdict:
        """Count one evaluation (`values` as logged: val_loss, ...); the same verdict on every rank."""
        values = _from_rank0(values)
        if self.metric not in values:
            raise EarlyStopError(f"--early-stop-metric {self.metric} is not among this evaluation's values "
                                 f"({', '.join(sorted(values))}); pick one of them")
        value = float(values[self.metric])
        improved = self._better(value, self.best, 0.0)
        if improved:
            self.best, self.best_step = value, step
        if self._better(value, self.reference, self.min_delta):
            self.reference, self.since = value, 0
        else:
            self.since += 1
        self.last_step, self.last_value = step, value
        return Verdict(value, improved, self.should_stop())

    def should_stop(self) -> bool:
        return self.patience is not None and self.since >= self.patience

    def why(self) -> str:
        return (f"{self.metric} has not improved by more than {self.min_delta:g} for {self.since} evaluation(s) "
                f"(--early-stop-patience {self.patience}); best {self.best:.6g} at iteration {self.best_step}")


def _from_rank0(values: dict) -> dict:
    if not dist.is_initialized():
        return values
    box = [values if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
