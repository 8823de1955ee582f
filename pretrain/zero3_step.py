"""ZeRO-3 at one gather and one reduce per optimizer step, where DeepSpeed's own buffers already hold the model.

Why (issue 32): DeepSpeed 0.19.8's ZeRO-3 gathers every layer's parameters again for each micro-batch and
reduce-scatters each micro-batch's gradients at the end of its backward. ZeRO-1 communicates once per optimizer
step. With 2 micro-batches per step (bench/zero3_profile.py: tiny model, 8 layers, DP 2, CPU) that per-micro-batch
traffic and its host work (bucket copies, interleaving, partition copies, hook bookkeeping) cost ZeRO-3 about a
third more than ZeRO-1. Two of DeepSpeed's own buffers make the repeat unnecessary for models that fit them:

- **Hold the gathered parameters across the step's micro-batches.** When a rank's partitioned parameters add up to
  no more than `stage3_prefetch_bucket_size` (and `stage3_max_live_parameters`), DeepSpeed's prefetch already
  gathers the whole model at the first fetch of every forward and of every backward, so each micro-batch peaks
  with all of it gathered anyway. Holding it from the first micro-batch to the last changes no peak; it only
  skips the regathers. Mechanism: a sentinel in each parameter's `ds_active_sub_modules` (DeepSpeed releases a
  parameter only when that set is empty, partitioned_param_coordinator.py `__release_param`), taken out before
  the last micro-batch so that its hooks release as usual; `engine.step()` partitions everything in any case
  (stage3.py `step` -> `partition_all_parameters`, which clears those sets).
  The persistent parameters (norms) then join that one gather instead of DeepSpeed's per-tensor gathers after
  every step (OneExchangePerStep.__init__).
- **Reduce the step's gradients once.** When a rank's trainable parameters fit `reduce_bucket_size`, DeepSpeed
  allocates a reduce bucket as large as the whole model's gradients (stage3.py, the IPG buffer; our "auto" size
  is capped at the model, pretrain.engine.fit_zero3_reduce_bucket) and it holds all of a micro-batch's gradients
  before the one reduce-scatter at the end of its backward. The next micro-batches' gradients are added into the
  same places instead (autograd accumulates into the bucket views that DeepSpeed leaves in `param.grad`), and
  the bucket is reduce-scattered once after the last backward, as ZeRO-1/2 do under `no_sync`. No memory is
  added: DeepSpeed's own `engine.coalesce_grad_reduction()` keeps whole `param.grad` tensors beside the bucket
  (one more model of gradients), which is why it is not used. DeepSpeed reduces every micro-batch by design so
  that a rank keeps only its gradient partition (its maintainers in deepspeedai/DeepSpeed#2252), and FSDP2 leaves
  the choice to the loop (`set_requires_gradient_sync`, pytorch/torchtitan#292) for the same memory reason;
  neither looks at whether a full-model buffer is already allocated, which is the case here.

On a GPU (overlap_comm) DeepSpeed copies gradients into the bucket on its own reduce stream and synchronises it in
the epilogue that the deferral skips: the compute stream waits for that stream after each deferred micro-batch,
and the reduce stream for the compute stream before the one reduction (an independent review found the gap; no
GPU has run this path yet, bench/gpu_zero3.sh's tiny rows would).

Neither applies to models larger than those buffers (a 1B model's layer already exceeds the 4e7-element prefetch
floor, and the reduce bucket is capped at 1e8 elements), nor with parameter or optimizer offload, nor in
pipelines (ZeRO-1 only). `install` decides once per engine and says why not. The third saving is process-wide and
always on (`trim_host_work`): DeepSpeed walks a module's `named_parameters` on every fetch, release and reuse
check (~2,000 walks of a Block's ~15 submodules per step at 8 layers); the parameters of a module do not change
once the engine is built, so each walk is computed once; and DeepSpeed's NVTX ranges are off unless asked for.

Equality is tested (tests/pretrain/test_zero3_step.py): losses, gradient norms and parameters equal the plain
DeepSpeed path (1e-6) under DP 2, TP 2 x DP 2, recompute and the document mask, and the number of all-gathers and
reduce-scatters per step is what the docstring above says.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

HOLD = -(2**31)  # a sub-module id DeepSpeed never hands out (its ids count up from 0)


def trim_host_work() -> None:
    """Two process-wide savings in DeepSpeed's per-module hooks (module docstring):
    - each module's parameter list computed once for the coordinator. Install after deepspeed.initialize. The
      model's external parameters (the tied embedding and the chunked loss's output weight, used by the head) are
      registered when it is built (pretrain/model.py); DeepSpeed can also register one during a forward when a
      module reads another's parameter (parameter_offload.py, ZeROOrderedDict), which no module here does:
      `walks_match` checks the cache against fresh walks (tests/pretrain/test_zero3_step.py, after training).
    - DeepSpeed's NVTX ranges (`deepspeed.utils.nvtx.enable_nvtx`, its own switch) off: ~5,000 wrapped calls
      per step at 8 layers, each asking whether torch.compile is tracing and the accelerator for a range push,
      which only an Nsight trace reads. PRETRAIN_NVTX=1 keeps them for nsys."""
    import os

    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator
    from deepspeed.utils import nvtx

    nvtx.enable_nvtx = os.environ.get("PRETRAIN_NVTX", "0") == "1"
    if getattr(coordinator.iter_params, "cached", False):
        return
    walk = coordinator.iter_params

    def iter_params(module, recurse=False):
        cache = module.__dict__.setdefault("_zero3_param_walks", {})  # on the module: it lives as long as they do
        params = cache.get(recurse)
        if params is None:
            params = cache[recurse] = tuple(walk(module, recurse))
        return iter(params)

    iter_params.cached = True
    coordinator.iter_params = iter_params
    parameter_offload.iter_params = iter_params  # imported by name there


def walks_match(module) -> bool:
    """Every cached parameter walk (trim_host_work) equals a fresh one: nothing registered after the cache."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import get_all_parameters

    for m in module.modules():
        for recurse, cached in m.__dict__.get("_zero3_param_walks", {}).items():
            if [id(p) for p in cached] != [id(p) for _, p in get_all_parameters(m, recurse)]:
                return False
    return True


@dataclass
class Decision:
    hold: bool
    hold_why: str
    reduce_once: bool
    reduce_why: str

    def describe(self) -> str:
        if self.hold_why == self.reduce_why == "one micro-batch per step":
            return "ZeRO-3 step: one micro-batch per step (parameters gathered and gradients reduced once)"
        hold = "held across micro-batches" if self.hold else f"gathered per micro-batch ({self.hold_why})"
        red = "reduced once per step" if self.reduce_once else f"reduced per micro-batch ({self.reduce_why})"
        return f"ZeRO-3 step: parameters {hold}; gradients {red}"


def why_not_hold(partitioned: int, window: float, grad_accum: int) -> str:
    """Empty when a rank's partitioned parameter elements fit the prefetch window (min of
    stage3_prefetch_bucket_size and stage3_max_live_parameters) and a step has micro-batches to hold them across;
    else why not. One rule for the engine (decide) and the planner (pretrain.steptime)."""
    if grad_accum == 1:
        return "one micro-batch per step"
    if partitioned > window:
        return f"{partitioned:,} partitioned elements > the prefetch window of {int(window):,}"
    return ""


def why_not_reduce_once(gradients: int, reduce_bucket: float, grad_accum: int) -> str:
    """Empty when a rank's gradient elements fit ZeRO-3's reduce bucket (so it never flushes mid-backward) and a
    step has micro-batches to sum; else why not. Shared with the planner like why_not_hold."""
    if grad_accum == 1:
        return "one micro-batch per step"
    if gradients > reduce_bucket:
        return f"{gradients:,} gradient elements > reduce_bucket_size {int(reduce_bucket):,}"
    return ""


def decide(engine) -> Decision:
    """Which of the two savings this engine can take without more memory (module docstring)."""
    opt, zero, m = engine.optimizer, engine._config.zero_config, engine.gradient_accumulation_steps()
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_id")]
    trainable = [p for p in params if p.requires_grad]
    offloaded = zero.offload_param is not None and zero.offload_param.device != "none"
    window = min(zero.prefetch_bucket_size, zero.max_live_parameters)
    partitioned = sum(p.ds_numel for p in params if not p.ds_persist)
    hold_why = "parameters offloaded" if offloaded else why_not_hold(partitioned, window, m)
    dtypes = {opt.get_param_comm_dtype(p) for p in trainable}
    groups = {id(opt._get_param_partition_group(p)) for p in trainable}  # a second group empties the bucket
    if offloaded or getattr(opt, "offload_optimizer", False):
        reduce_why = "parameters or optimizer offloaded"
    elif not opt.contiguous_gradients:
        reduce_why = "contiguous_gradients is off"
    elif len(groups) != 1:
        reduce_why = "parameters in more than one partition group"
    elif len(dtypes) != 1 or next(iter(dtypes)) != opt.gradient_accumulation_dtype:
        reduce_why = "the bucket's dtype is not the gradient accumulation dtype"
    elif getattr(opt, "zenflow", False):
        reduce_why = "ZenFlow"
    else:
        reduce_why = why_not_reduce_once(sum(p.ds_numel for p in trainable), opt.reduce_bucket_size, m)
    return Decision(not hold_why, hold_why, not reduce_why, reduce_why)


class OneExchangePerStep:
    """Installed on a ZeRO-3 engine by `install`; pretrain.step.train_step wraps a step in `step()` and calls
    `micro_batch(m)` before each forward and `flush()` after the last backward."""

    def __init__(self, engine, decision: Decision):
        self.engine, self.decision = engine, decision
        self.opt = engine.optimizer
        self.params = [p for p in engine.module.parameters() if hasattr(p, "ds_id") and not p.ds_persist]
        self.deferring = False
        self.slots: dict[int, object] = {}  # ds_id -> the parameter's view in the reduce bucket
        if decision.hold:
            # The persistent parameters (norms, under stage3_param_persistence_threshold): DeepSpeed gathers them
            # again after every step, one all-gather per tensor (partition_parameters.py,
            # _allgather_params_coalesced: 33 at 16 layers, 10-20 ms of gloo latency here). Where the whole model
            # is gathered at once per step anyway, they join that gather: with the optimizer's list empty, its
            # _post_step (and the checkpoint epilogue) leaves them partitioned after the step, and their modules'
            # fetch gathers them with the rest. Their ds_persist mark stays: the hooks never release them, step()
            # does (release_and_reset_all).
            self.opt.persistent_parameters = []
        if decision.reduce_once:
            trainable = next(p for p in self.params if p.requires_grad)
            self.bucket = self.opt.ipg_buckets[self.opt.get_param_comm_dtype(trainable)]  # the one bucket (decide)
            # instance attributes shadow the class's methods; DeepSpeed calls both through self at call time
            self._reduce = self.opt.reduce_ready_partitions_and_remove_grads
            self._epilogue = self.opt.independent_gradient_partition_epilogue
            self.opt.reduce_ready_partitions_and_remove_grads = self._reduce_ready
            self.opt.independent_gradient_partition_epilogue = self._maybe_epilogue

    # ---------------------------------------------------------------- the step
    @contextlib.contextmanager
    def step(self):
        self.deferring = self.decision.reduce_once
        try:
            yield self
        except BaseException:
            self._abandon()
            raise
        finally:
            self.deferring = False
            self._hold(False)

    def micro_batch(self, m: int) -> None:
        """Before micro-batch m's forward: hold from the first, let the last release as DeepSpeed does."""
        if self.decision.hold:
            self._hold(m < self.engine.gradient_accumulation_steps() - 1)

    def flush(self) -> None:
        """After the last backward: the one reduce-scatter of the step's summed gradients (DeepSpeed's own
        epilogue, which also hands the partitions to the optimizer)."""
        if not self.deferring:
            return
        self.deferring = False
        for p in self.bucket.params:
            slot = self.slots[p.ds_id]
            if p.grad is None or p.grad.data_ptr() != slot.data_ptr():
                raise RuntimeError(f"ZeRO-3 reduce-once: parameter {p.ds_id}'s gradient left its reduce bucket "
                                   "place between micro-batches; set PRETRAIN_ZERO3_STEP=0 to use DeepSpeed's "
                                   "per-micro-batch reduction and report this")
        if set(self.slots) != {p.ds_id for p in self.bucket.params}:  # the bucket was emptied mid-step
            raise RuntimeError("ZeRO-3 reduce-once: the reduce bucket no longer holds the step's gradients (DeepSpeed "
                               "reduced it mid-step); set PRETRAIN_ZERO3_STEP=0 and report this")
        self.slots.clear()
        stream = self.opt.reduce_and_partition_stream
        if stream is not None:  # the reduce runs on DeepSpeed's stream: after the last backward's in-place adds
            from deepspeed.accelerator import get_accelerator

            stream.wait_stream(get_accelerator().current_stream())
        self._epilogue()

    # ---------------------------------------------------------------- DeepSpeed's hooks, while deferring
    def _reduce_ready(self, param):
        if not self.deferring:
            return self._reduce(param)
        slot = self.slots.get(param.ds_id)
        if slot is None:  # first micro-batch: DeepSpeed copies it into the bucket and leaves param.grad a view
            self._reduce(param)
            if not self.bucket.params or self.bucket.params[-1] is not param:
                raise RuntimeError(f"ZeRO-3 reduce-once: parameter {param.ds_id} did not enter the reduce bucket; "
                                   "set PRETRAIN_ZERO3_STEP=0 and report this")
            self.slots[param.ds_id] = param.grad
        elif param.grad.data_ptr() != slot.data_ptr():
            # autograd accumulated out of place (grad + new): the sum goes back into the bucket
            slot.copy_(param.grad.view_as(slot))
            param.grad.data = slot
        # else autograd accumulated in place, into the bucket: nothing to do

    def _maybe_epilogue(self):
        if not self.deferring:
            return self._epilogue()
        # deferring: the bucket keeps this micro-batch's gradients for the next one; flush() reduces them. On a GPU
        # DeepSpeed copied them into the bucket on its reduce stream (overlap_comm) and would synchronise it here:
        # the next micro-batch's in-place adds on the compute stream must come after those copies.
        stream = self.opt.reduce_and_partition_stream
        if stream is not None:  # None on a synchronized device (CPU)
            from deepspeed.accelerator import get_accelerator

            get_accelerator().current_stream().wait_stream(stream)

    # ---------------------------------------------------------------- helpers
    def _hold(self, on: bool) -> None:
        for p in self.params:
            (p.ds_active_sub_modules.add if on else p.ds_active_sub_modules.discard)(HOLD)

    def _abandon(self) -> None:
        """A step that raised: drop the deferred gradients (DeepSpeed's state as after a fresh zero_grad)."""
        if self.slots:
            for p in self.bucket.params:
                p.grad = None
            self.bucket.params.clear()
            self.bucket.elements = 0
            self.slots.clear()


def install(engine):
    """Decide and install on a ZeRO-3 engine (no-op for other stages): sets `engine.zero3_step` (the
    OneExchangePerStep, or None) and `engine.zero3_decision` (the Decision, for the run's log).
    PRETRAIN_ZERO3_STEP=0 keeps DeepSpeed as it is (per-micro-batch path, its walks and NVTX ranges): the
    comparisons' baseline, and bisecting."""
    import os

    if not engine.zero_optimization_partition_weights():
        return None
    engine.zero3_step = engine.zero3_decision = None
    if os.environ.get("PRETRAIN_ZERO3_STEP", "1") == "0":  # DeepSpeed as it is: the baseline of the tests
        return None
    trim_host_work()
    decision = engine.zero3_decision = decide(engine)
    if decision.hold or decision.reduce_once:
        engine.zero3_step = OneExchangePerStep(engine, decision)
    return engine.zero3_step
