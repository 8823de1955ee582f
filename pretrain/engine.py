"""Model -> DeepSpeed engine: the DeepSpeed config filled from the layout, ZeRO-3 partitioned over the
data-parallel group only, the optimizer with no weight decay on norms and biases."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch

from pretrain.config import ModelConfig
from pretrain.parallel import Layout, LayoutError, MegatronMpu


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0


_BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": ("--micro-batch-size", lambda lay: lay.micro_batch_size),
    "gradient_accumulation_steps": ("--global-batch-size / (micro-batch-size x DP)",
                                    lambda lay: lay.grad_accum_steps),
    # DeepSpeed counts every rank of its data-parallel group, DP x CP (pretrain/parallel.py), as a replica
    "train_batch_size": ("--global-batch-size (x --cp)", lambda lay: lay.global_batch_size * lay.cp),
}


# ZeRO fields sized from the model's hidden size h when a config says "auto". Parameters smaller than 10 h elements
# (norm weights, biases) stay whole (Hugging Face's rule, transformers/integrations/deepspeed.py). The buckets are
# Hugging Face's h x h (prefetch 0.9 h x h) raised to at least 4e7 elements (megatron-core's DDP bucket floor) and
# capped at 1e8 (issue 32). Why: every bucket flush is one collective with its fixed cost, and h x h made ZeRO-3
# reduce-scatter each gradient alone (16,384 elements at h 128): on the 2-core CPU, 8 layers, DP 2, 102 reduce-
# scatters per step, and with their bucketing and partition copies 752 of a 1,545-ms step; with one bucket per
# micro-batch 99 ms (bench/zero3_profile.py, medians of paired runs under load). On GPUs the floor gives 1B
# ~1.5 reduce-scatters per layer instead of 6, 7B 5 instead of 6 (pretrain.steptime.bucket_flushes). The cost is
# memory: DeepSpeed's ZeRO-3 allocates the whole reduce bucket up front (stage3.py, the IPG buffer, in the
# communication dtype; the reduce-scatter copies it once more), so 4e7 is 80 MB in bf16 and the 1e8 cap
# (h > 10,000) 200 MB; build_engine caps it further at the rank's own parameters (a tiny model needs no
# 4e7-element buffer). The prefetch bucket only sets how far ahead parameters are
# all-gathered; what it may hold gathered is bounded by stage3_max_live_parameters (pretrain.plan).
_BUCKET_FLOOR, _BUCKET_CAP = 4e7, 1e8
_ZERO_AUTO = {
    "reduce_bucket_size": lambda h: min(max(h * h, _BUCKET_FLOOR), _BUCKET_CAP),
    "stage3_prefetch_bucket_size": lambda h: min(max(0.9 * h * h, _BUCKET_FLOOR), _BUCKET_CAP),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def zero_auto(key: str, hidden_size: int) -> int:
    """What "auto" gives zero_optimization.`key` for this hidden size (the planner's defaults use the same rule)."""
    return int(_ZERO_AUTO[key](hidden_size))


def load_ds_config(source, layout: Layout, clip_grad: float, fp32: bool = False,
                   hidden_size: int | None = None, sequence_parallel: bool = False) -> dict:
    """Read a DeepSpeed JSON config and fill its "auto" fields: batch sizes from the layout, ZeRO bucket sizes and
    the ZeRO-3 persistence threshold from `hidden_size`; `fp32` turns mixed precision off whatever the file says
    (--fp32: debugging and exactness tests).

    A concrete value that disagrees with the command line is an error naming both, rather than DeepSpeed's
    later and vaguer batch-size assertion.
    """
    path = source if isinstance(source, str) else "<dict>"
    if isinstance(source, str):
        with open(source) as f:
            cfg = json.load(f)
    else:
        cfg = copy.deepcopy(source)
    for key, (flag, value_of) in _BATCH_KEYS.items():
        want = value_of(layout)
        have = cfg.get(key, "auto")
        if have != "auto" and int(have) != want:
            raise LayoutError(f"{path}: {key}={have} contradicts {flag} which gives {want}; set it to \"auto\" "
                              f"or make the flags agree")
        cfg[key] = want
    zero = cfg.setdefault("zero_optimization", {})
    for key, rule in _ZERO_AUTO.items():
        if zero.get(key) == "auto":
            if hidden_size is None:
                raise LayoutError(f"{path}: zero_optimization.{key} is \"auto\" but no hidden size was given")
            zero[key] = int(rule(hidden_size))
    config_stage = int(zero.get("stage", 0))
    if config_stage != layout.zero_stage:
        raise LayoutError(f"{path}: zero_optimization.stage={config_stage} but the layout was validated for "
                          f"stage {layout.zero_stage}")
    # DeepSpeed 0.19.8 silently defaults gradient_clipping to 1.0; always say what we mean.
    cfg["gradient_clipping"] = float(clip_grad)
    cfg.setdefault("steps_per_print", 10**9)
    cfg["zero_allow_untested_optimizer"] = True  # our optimizer is torch's AdamW
    if fp32:
        cfg["bf16"] = {"enabled": False}
        cfg.pop("fp16", None)
    if layout.pp > 1 and cfg.get("bf16", {}).get("enabled"):
        # bf16 + PP + ZeRO-1 needs fp32 gradient accumulation (DeepSpeed issue 1835).
        cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if layout.pp > 1 and sequence_parallel:
        # DeepSpeed's pipeline engine sends 1/TP of each activation per TP rank and all-gathers it on the next
        # stage ("pipe_partitioned", on by default), assuming the TP ranks hold the same activation; under
        # sequence parallelism each holds its own part of the sequence, and the gathered tensor would be wrong.
        cfg["pipeline"] = {**cfg.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    return cfg


def zero_stage_of(source) -> int:
    if isinstance(source, str):
        with open(source) as f:
            source = json.load(f)
    return int(source.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases (1-D tensors) get no weight decay, as in Megatron and nanoGPT."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO-3 partitions are flat
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups: list[dict], ds_config: dict, opt: OptimConfig):
    kwargs = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    # torch's fused AdamW: one kernel for all parameters on GPU, no DeepSpeed JIT build needed.
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **kwargs)


def build_model(cfg: ModelConfig, layout: Layout, ds_config: dict, options, seed: int):
    """Construct the model for this rank (partitioned at construction under ZeRO-3) and initialise it."""
    import deepspeed
    from megatron.core import parallel_state

    from pretrain.model import GPT, build_pipeline, init_parameters

    if layout.pp > 1:
        model = build_pipeline(cfg, layout.tp, layout.pp, layout.dp, options, seed)  # (x CP: the model's topology)
    elif layout.zero_stage == 3:
        # Partition over the data-parallel group only: the default (whole world) would split TP shards
        # across TP ranks and silently compute a wrong loss (docs/FINDINGS.md, "ZeRO-3 together with tensor
        # parallelism").
        with deepspeed.zero.Init(data_parallel_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
                                 config_dict_or_path=ds_config, mpu=MegatronMpu()):
            model = GPT(cfg, layout.tp, options)
        # One ZeRO-3 fetch unit per transformer layer: DeepSpeed hooks every submodule (about 17 per layer: norms,
        # linears, attention, RoPE, IdentityOps) and fetches, waits and releases per submodule; as a leaf the whole
        # Block is fetched in one all-gather before its forward and reduced after its backward. On the 2-core CPU
        # (bench/zero3_profile.py, 8 layers, DP 2) the sub-module hook calls went from 288 to 32 per step and their
        # host time from 176 ms to 49 ms. Recompute ("full" checkpoints inside Block, "selective" inside
        # megatron's layer) runs with the layer's parameters already gathered by the leaf's backward fetch; TP
        # is untouched (the layer's own collectives). Not leaves: the output layer (the leaf's full backward hook
        # wraps the logits, which the vocab-parallel cross-entropy modifies in place: autograd refuses it) and,
        # with it, the embedding and final norm (a parameter was released before its backward: not pursued, 3 of
        # ~20 modules). A leaf's gradients are reduced from a torch full backward hook, which sees only top-level
        # tensor arguments, so GPT.logits passes a Block (hidden, doc ids) as two arguments, never as one tuple.
        from deepspeed.utils import set_z3_leaf_modules

        from pretrain.model import Block

        set_z3_leaf_modules(model, [Block])
    else:
        model = GPT(cfg, layout.tp, options)
    init_parameters(model, cfg, seed)
    return model


def build_engine(cfg: ModelConfig, layout: Layout, ds_config: dict, opt: OptimConfig, options=None,
                 seed: int = 1234, compile_layers: bool = False, fused_swiglu: bool = False):
    """Model -> DeepSpeed engine, in this order (each step assumes the ones before it):
    1. construct the model: tensor parallelism lives inside megatron's layers; PP > 1 cuts the layer list into
       DeepSpeed pipeline stages; under ZeRO-3 parameters are partitioned over the data-parallel group as they
       are created (zero.Init), so no rank ever holds the whole model. `options` (pretrain.model.ModelOptions)
       are chosen here too: recompute (megatron's selective modules, or Block's full-layer checkpoint),
       sequence parallelism (inside megatron's layers, from their config) and document masking.
    2. initialise every weight from (seed, canonical name): the same model under any layout.
    3. the optimizer: AdamW over decay / no-decay groups (DeepSpeedCPUAdam when the optimizer is offloaded).
    4. deepspeed.initialize: ZeRO partitioning of gradients and optimizer states, bf16, gradient clipping.
    5. kernels (GPU speed, opt-in): megatron's fused SwiGLU, then torch.compile of each transformer layer, on
       the wrapped module's layers, as measured on an H100 (bench/RESULTS.md). validate_layout refuses compile
       under ZeRO-3, whose parameter hooks break compiled layers.
    """
    import deepspeed

    from pretrain.compat import defer_deepspeed_muon_compile
    from pretrain.model import apply_speedups
    from pretrain.step import guard_plain_optimizer
    from pretrain import moe, zero3_step
    from pretrain.zero_state import undo_construction_step

    from pretrain.model import ModelOptions

    defer_deepspeed_muon_compile()
    ds_config = fit_zero3_reduce_bucket(ds_config, cfg, layout)
    if cfg.is_moe and ds_config.get("fp16", {}).get("enabled"):
        raise LayoutError("a mixture of experts under fp16: megatron's routers add their auxiliary-loss gradient "
                          "outside DeepSpeed's loss scaling, so the dynamic loss scale would weigh it wrongly; use "
                          "bf16 (the shipped configs) or --fp32")
    model = build_model(cfg, layout, ds_config, options or ModelOptions(), seed)
    groups = param_groups(model, opt.weight_decay)
    if cfg.is_moe:
        moe.prepare_for_deepspeed(model, cfg, layout.ep)  # EP > 1: expert gradients over the expert-DP ranks
        moe.set_aux_loss_scale(layout.grad_accum_steps, layout.cp)
        groups = moe.split_optimizer_groups(groups) if layout.ep > 1 else groups
    optimizer = build_optimizer(groups, ds_config, opt)
    # With a PipelineModule the topology comes from the module, and DeepSpeed must get no mpu.
    mpu = None if layout.pp > 1 else MegatronMpu()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    guard_plain_optimizer(engine)  # fp32 ZeRO-0 is the one case DeepSpeed applies non-finite gradients
    undo_construction_step(engine)  # bf16 ZeRO-0's optimizer stepped once at construction
    zero3_step.install(engine)  # ZeRO-3: one gather and one reduce per step where DeepSpeed's buffers allow
    if cfg.is_moe:
        engine.moe_stats = moe.RoutingStats(engine.module, cfg.num_layers)  # aux loss, expert load: step._result
    if compile_layers or fused_swiglu:
        apply_speedups(engine.module, compile_layers, fused_swiglu)
    return engine


def fit_zero3_reduce_bucket(ds_config: dict, cfg: ModelConfig, layout: Layout) -> dict:
    """ZeRO-3 allocates its whole reduce bucket up front (reduce_bucket_size elements; DeepSpeed 0.19.8 stage3.py),
    and a bucket larger than this rank's parameters never holds more than them: cap it there (the same flushes,
    less memory; "auto" gives at least 4e7 elements, 160 MB in fp32 for a model of a few million)."""
    zero = ds_config.get("zero_optimization", {})
    if layout.zero_stage != 3 or not isinstance(zero.get("reduce_bucket_size"), (int, float)):
        return ds_config
    from pretrain.sharding import stage_parameters

    params = sum(n for _, n in stage_parameters(cfg, layout.tp, 1, 0))
    if zero["reduce_bucket_size"] <= params:
        return ds_config
    return {**ds_config, "zero_optimization": {**zero, "reduce_bucket_size": int(params)}}


def zero3_partitioning(engine) -> dict:
    """Under ZeRO-3: how many parameter tensors (and elements) this rank holds only a partition of; the rest stay
    whole on every rank (DeepSpeed's stage3_param_persistence_threshold). Empty for other stages."""
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_numel")]
    split = [p for p in params if not getattr(p, "ds_persist", False) and p.ds_tensor.numel() < p.ds_numel]
    return {"zero3_params": len(params), "partitioned": len(split),
            "partitioned_elements": sum(p.ds_numel for p in split),
            "all_elements": sum(p.ds_numel for p in params)} if params else {}
