"""Where a DeepSpeed engine keeps each parameter's fp32 master weights and Adam moments, whatever the layout.

Checkpoints are written and read through this module instead of DeepSpeed's save_checkpoint/load_checkpoint
(pretrain/checkpoint.py says why). Every optimizer DeepSpeed may wrap ours in holds, for each model parameter,
one or more contiguous ranges of the flattened (tensor-parallel local) parameter, each stored at some offset of a
flat fp32 tensor that the base optimizer steps (its `owner`; Adam's moments live in the base optimizer's state
for that owner, at the same offset). A `Slot` is one such range held by this rank:

  ZeRO-1/2, bf16 BF16_Optimizer   `param._hp_mapping`: this data-parallel rank's fragment of the parameter
                                  inside its partition of the flat fp32 group (lp_fragment_address = range,
                                  hp_fragment_address = offset); DeepSpeed's own tensor-fragment API reads these.
  ZeRO-3                          the parameter's own partition: elements [r * p, r * p + p) of p = ceil(n / dp)
                                  on data-parallel rank r, at `grad_position` inside its fp32 sub-group.
  ZeRO-0, bf16                    the whole parameter: its own fp32 copy (FP16_UnfusedOptimizer, what our AdamW
                                  gets), or its place in its group's flat fp32 copy (FP16_Optimizer, with
                                  DeepSpeed's fused Adam); replicated over DP.
  ZeRO-0, fp32 (our AdamW)        the whole parameter is its own master (replicated over DP).

DeepSpeed 0.19.8 initialises Adam's state lazily (at the first step), so loading creates it first
(`prepare_states`), then writes every slot, then refreshes the low-precision copies (`refresh_model_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.sharding import named_parameters

STATES = ("fp32", "exp_avg", "exp_avg_sq")  # master weights, Adam's first and second moments


@dataclass
class Slot:
    name: str  # canonical parameter name (pretrain/sharding.py)
    param: torch.nn.Parameter  # the model's (low-precision) parameter
    start: int  # first element of the range, in the flattened tensor-parallel-local parameter
    numel: int
    owner: torch.Tensor  # the flat fp32 tensor the base optimizer steps
    offset: int  # where the range starts inside `owner`
    replicated: bool  # every data-parallel rank holds this same slot (ZeRO-0): one of them writes it


def _kind(engine) -> str:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
        return "fragments"
    if isinstance(opt, FP16_Optimizer):
        return "flat_groups"
    if isinstance(opt, FP16_UnfusedOptimizer):
        return "fp32_copies"
    if isinstance(opt, torch.optim.Optimizer):
        return "plain"
    raise TypeError(f"checkpointing does not know DeepSpeed's {type(opt).__name__}; supported: ZeRO 0-3, bf16 or "
                    f"fp32 (pretrain/zero_state.py)")


def base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return opt if _kind(engine) == "plain" else opt.optimizer


def _names(engine) -> dict[int, str]:
    return {id(p): n for n, p in named_parameters(engine.module)}


def slots(engine) -> list[Slot]:
    """This rank's slots, in a deterministic order (the optimizer's)."""
    kind, names, opt = _kind(engine), _names(engine), engine.optimizer
    out = []
    if kind == "plain":
        for group in opt.param_groups:
            for p in group["params"]:
                out.append(Slot(names[id(p)], p, 0, p.numel(), p, 0, replicated=True))
    elif kind == "fp32_copies":
        for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
            for p, hp in zip(lp_group, hp_group):
                out.append(Slot(names[id(p)], p, 0, p.numel(), hp, 0, replicated=True))
    elif kind == "flat_groups":
        for lp_group, owner in zip(opt.fp16_groups, opt.fp32_groups_flat):
            offset = 0
            for p in lp_group:
                out.append(Slot(names[id(p)], p, 0, p.numel(), owner, offset, replicated=True))
                offset += p.numel()
    elif kind == "fragments":
        owners = {t.untyped_storage().data_ptr(): t for g in opt.optimizer.param_groups for t in g["params"]}
        for group in opt.bit16_groups if hasattr(opt, "bit16_groups") else opt.bf16_groups:
            for p in group:
                frag = getattr(p, "_hp_mapping", None)
                if frag is None:  # this rank's partition holds none of p
                    continue
                owner = owners[frag.hp_fragment.untyped_storage().data_ptr()]
                out.append(Slot(names[id(p)], p, frag.lp_fragment_address.start, frag.lp_fragment_address.numel,
                                owner, frag.hp_fragment_address.start, replicated=False))
    else:  # zero3
        rank = torch.distributed.get_rank(group=opt.dp_process_group)
        for group in opt.fp16_groups:
            for p in group:
                sub_group, offset, partition = opt.grad_position[opt.get_param_id(p)]
                start = rank * partition
                numel = max(0, min(partition, p.ds_numel - start))
                if numel:
                    out.append(Slot(names[id(p)], p, start, numel, opt.fp32_partitioned_groups_flat[sub_group],
                                    offset, replicated=False))
    return out


def read(engine, slot: Slot, state: str) -> torch.Tensor:
    """The slot's values of `state` (a view; zeros if the optimizer has not created its state yet)."""
    if state == "fp32":
        return slot.owner.detach().view(-1).narrow(0, slot.offset, slot.numel)
    st = base_optimizer(engine).state.get(slot.owner, {})
    if state not in st:
        return torch.zeros(slot.numel, dtype=torch.float32)
    return st[state].view(-1).narrow(0, slot.offset, slot.numel)


def write(engine, slot: Slot, state: str, values: torch.Tensor) -> None:
    target = read(engine, slot, state) if state == "fp32" else \
        base_optimizer(engine).state[slot.owner][state].view(-1).narrow(0, slot.offset, slot.numel)
    target.copy_(values.reshape(-1).to(target.dtype))


def adam_step(engine) -> int:
    """Optimizer steps applied so far (Adam's bias-correction counter; the same for every parameter)."""
    for st in base_optimizer(engine).state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def prepare_states(engine, step: int) -> None:
    """Create Adam's state for every owner where DeepSpeed has not yet (lazily at the first step) and set its
    step counter, so that every slot can be written."""
    opt = base_optimizer(engine)
    owners = {id(s.owner): s.owner for s in slots(engine)}
    if _kind(engine) == "zero3":
        owners.update({id(t): t for t in engine.optimizer.fp32_partitioned_groups_flat if t.numel()})
    example = next((st["step"] for st in opt.state.values() if "step" in st), None)
    for owner in owners.values():
        st = opt.state.setdefault(owner, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in st:
                st[key] = torch.zeros_like(owner, memory_format=torch.preserve_format)
        st["step"] = _step_like(example, owner, opt, step)


def _step_like(example, owner: torch.Tensor, opt, step: int):
    """Adam's `step` in the form the optimizer keeps it: an int (DeepSpeedCPUAdam), a float32 scalar on the
    owner's device (torch's fused/capturable AdamW) or on the CPU (torch's default)."""
    if example is not None and not torch.is_tensor(example):
        return step
    if example is not None:
        return torch.tensor(float(step), dtype=example.dtype, device=example.device)
    if type(opt).__name__ == "DeepSpeedCPUAdam":
        return step
    group = opt.param_groups[0] if opt.param_groups else {}
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=owner.device if on_device else "cpu")


def refresh_model_weights(engine) -> None:
    """After masters were written: make the model's (bf16 or fp32) parameters equal them, as the optimizer
    does after a step. Collective for ZeRO-1/2/3 (all-gather over data parallel)."""
    kind, opt = _kind(engine), engine.optimizer
    if kind == "fragments":
        opt.update_lp_params()
    elif kind == "flat_groups":
        for lp_flat, hp_flat in zip(opt.fp16_groups_flat, opt.fp32_groups_flat):
            lp_flat.data.copy_(hp_flat.data)
    elif kind == "fp32_copies":
        for slot in slots(engine):
            slot.param.data.copy_(slot.owner.data)
    elif kind == "zero3":
        for slot in slots(engine):
            slot.param.ds_tensor.data.view(-1).narrow(0, 0, slot.numel).copy_(read(engine, slot, "fp32"))
        persistent = [p for group in opt.fp16_groups for p in group if getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].all_gather(param_list=persistent)


def undo_construction_step(engine) -> None:
    """DeepSpeed's bf16 ZeRO-0 optimizers (FP16_UnfusedOptimizer, FP16_Optimizer) create Adam's state by taking
    a step with zero gradients when they are built (initialize_optimizer_states, DeepSpeed 0.19.8): Adam's step
    counter starts at 1 and AdamW's weight decay shrinks every fp32 master once before training. No other layout
    does, so the same seed would not give the same model. Undo it: forget that state, and take the masters back
    from the model's parameters they were copied from."""
    kind, opt = _kind(engine), engine.optimizer
    if kind not in ("fp32_copies", "flat_groups"):
        return
    opt.optimizer.state.clear()
    if kind == "flat_groups":
        for lp_flat, hp_flat in zip(opt.fp16_groups_flat, opt.fp32_groups_flat):
            hp_flat.data.copy_(lp_flat.data)
    else:
        for slot in slots(engine):
            slot.owner.data.copy_(slot.param.data)
