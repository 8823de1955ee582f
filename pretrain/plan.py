"""Will it fit, and how fast? Per-GPU memory and step time for a model, layout and GPU, before any cluster hour.

  python -m pretrain.plan --model 7b --nodes 4 --gpus-per-node 8 --gpu h100-80gb --tp 2 --pp 1 --zero 3 \
      --micro-batch-size 1 --seq-length 4096 --recompute selective

Memory per GPU, in the same terms as DeepSpeed's estimators (Psi = parameters on this GPU's model-parallel
rank, d = data-parallel size, L = the largest single module's parameters, bytes per parameter):
  ZeRO-1     params 2 Psi   grads 2 Psi + 4 Psi/d   optimizer 12 Psi/d   (bf16 grads are whole until reduced)
  ZeRO-2     params 2 Psi   grads (2+4) Psi/d       optimizer 12 Psi/d   = DeepSpeed's 2 Psi + 18 Psi/d
  ZeRO-3     params 2 Psi/d grads 4 Psi/d           optimizer 12 Psi/d   + 4 L gathered = DeepSpeed's 4 L + 18 Psi/d
             (bf16 gradients are reduce-scattered out of the bucket into the fp32 partition)
  offload_optimizer moves the fp32 grads and optimizer states (16 Psi/d) to CPU, and (stage 2/3) the bf16 grads
  leave as they are reduced; offload_params (ZeRO-3) also moves the bf16 parameters. ZeRO-0 (DeepSpeed's bf16
  optimizer) keeps whole bf16 and fp32 grads: 2 + 2 + 4 Psi + 12 Psi/d. optimizer = fp32 master (4) + Adam (8).
Activations: a linear model in the layer's dimensions whose coefficients were measured from this code base's own
layers (pretrain.memory.fit_activation_model; bench/activation_memory.py re-measures them on a GPU).
The peak is the larger of two moments: the end of the forward pass (all activations, no gradients yet) and the
optimizer step (all gradients and communication buckets, no activations). At the end of the forward, ZeRO-3 on
DP > 1 holds more gathered than 4 L: up to `zero3_live_parameters` (measured; docs/FINDINGS.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict, dataclass

from pretrain import param_table, steptime
from pretrain.config import PRESETS, ModelConfig, preset
from pretrain.engine import zero_auto
from pretrain.objectives import OBJECTIVES, objective
from pretrain.parallel import LayoutError, validate_layout
from pretrain.sharding import stage_parameters

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    memory_gib: float  # what the device reports as total (nvidia-smi)
    bf16_tflops: float  # dense peak


GPUS = {
    "h100-80gb": GPU(79.6, 989.0), "h100-94gb": GPU(93.6, 835.0), "h200-141gb": GPU(140.4, 989.0),
    "a100-80gb": GPU(80.0, 312.0), "a100-40gb": GPU(40.0, 312.0), "l40s-48gb": GPU(44.4, 362.0),
}
# Outside PyTorch's allocator: CUDA context, NCCL communicators, cuBLAS workspaces; and allocator fragmentation.
RESERVED_GIB = 2.5
FRAGMENTATION = 0.05

# Bytes kept for backward, per token and per sequence position, by recompute mode (see pretrain.memory).
# Measured with bench/activation_memory.py: "cuda" on an H100 with torch 2.11 (2026-11-23; torch's CUDA RMSNorm
# keeps its input and rstd only), "cpu" here with torch 2.13 (the CPU RMSNorm keeps fp32 intermediates).
_CUDA_LAYER = {"token_h": 8, "token_f": 10, "token_q": 6, "token_kv": 6, "token_heads": 4, "token_one": 8,
               "position_d": 8}
ACTIVATION_COEFFICIENTS = {
    "cuda": {
        "none": _CUDA_LAYER,
        "selective": {**_CUDA_LAYER, "token_f": 0, "token_heads": 0},  # the MLP and core attention recomputed
        "full": {k: 0 for k in _CUDA_LAYER} | {"token_h": 2, "position_d": 4},  # the layer input and RoPE tables
        # logits_alive: bytes per logit not saved but alive at the peak (set from the H100 peaks, not measured
        # per layer: bench/run_all.py reports its leave-one-out error)
        "head": {"token_h": 4, "token_v": 4, "token_one": 17, "logits_alive": 2},
    },
}
# The CPU RMSNorm keeps fp32 intermediates: 12 more bytes per hidden unit per norm-using module.
ACTIVATION_COEFFICIENTS["cpu"] = {
    **{m: {**c, "token_h": c["token_h"] + 12} for m, c in ACTIVATION_COEFFICIENTS["cuda"].items()
       if m in ("none", "selective")},
    "full": ACTIVATION_COEFFICIENTS["cuda"]["full"],
    "head": {**ACTIVATION_COEFFICIENTS["cuda"]["head"], "token_h": 10},
}


# What a mixture of experts' layer keeps beyond the dense MLP's coefficients applied to k experts' widths, in bytes
# per routed token copy (bf16): a copy of its hidden state, of its expert's hidden units, and a few indices and
# weights. Fitted 2026-12-04 on CPU from megatron-core 0.16.1's MoELayer (SequentialMLP, alltoall dispatcher) at
# 5 shapes (hidden 256-384, expert width 352-704, 4-8 experts, top 1-4): within 1.4% of the measured layer;
# tests/pretrain/test_moe.py re-measures it.
MOE_COEFFICIENTS = {"copy_h": 2, "copy_f": 2, "copy_one": 50}


@dataclass
class PlanInput:
    model: ModelConfig
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "h100-80gb"
    tp: int = 1
    pp: int = 1
    zero: int = 3
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    seq_length: int = 2048
    recompute: str = "selective"
    sequence_parallel: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket_size: float = 5e7  # elements; ds_configs/zero3.json's "auto" gives 4e7-1e8 (pretrain/engine.py)
    prefetch_bucket_size: float = 5e7
    zero3_max_live_parameters: float = 1e9  # as in ds_configs/zero3.json
    zero3_max_reuse_distance: float = 1e9
    overlap_comm: bool = True
    device_type: str = "cuda"  # which measured activation coefficients
    intra_link: str | None = None  # pretrain.steptime.LINKS; default: the device's
    inter_link: str = "ib-ndr400"
    link_overrides: dict | None = None  # {"inter.bus_gbs": 25.0, ...}
    mask_prob: float = 0.15  # --objective mlm (model.objective): the share of tokens the loss counts
    async_save: bool = False  # --async-save: one host snapshot of each GPU's checkpoint share in flight
    loss_chunks: int | str = 1  # --loss-chunks: the output layer and loss over this many pieces of the sequence
    cp: int = 1  # --cp: each sample's sequence split across this many ranks
    ep: int = 1  # --ep: a mixture of experts' experts split across this many data-parallel ranks


def rank_params(cfg: ModelConfig, tp: int, pp: int, ep: int = 1) -> dict:
    """Parameters held by the busiest model-parallel rank (first or last pipeline stage), of which expert
    parameters (a mixture of experts: num_experts / ep of each layer's), and the largest single module, weight and
    bias (what ZeRO-3 gathers at once)."""
    modules: dict[tuple[int, str], int] = {}
    stages = [stage_parameters(cfg, tp, pp, stage, ep) for stage in {0, pp - 1}]
    for stage, tensors in enumerate(stages):
        for name, n in tensors:
            key = (stage, name.rsplit(".", 1)[0])
            modules[key] = modules.get(key, 0) + n
    busiest = max(stages, key=lambda tensors: sum(n for _, n in tensors))
    return {"per_gpu": sum(n for _, n in busiest), "largest_module": max(modules.values()),
            "experts_per_gpu": sum(n for name, n in busiest if param_table.lookup(name).per_expert)}


def moe_all_to_all_bytes(cfg: ModelConfig, tp: int, ep: int, seq: int, mb: int, sequence_parallel: bool,
                         dtype_bytes: int = 2) -> float:
    """Bytes one rank hands to all-to-all per transformer layer and micro-batch for expert parallelism (megatron's
    alltoall token dispatcher, pretrain/moe.py), forward and backward: each of the rank's tokens (its 1/TP of the
    sequence under sequence parallelism) goes to its top-k experts and comes back (hidden states, dispatch and
    combine, in each direction) with its routing weight (fp32); on average a rank receives as many as it sends.
    (ep - 1) / ep of it leaves the rank; a recompute (full, or selective: megatron's "moe" module) re-runs the
    forward's half. 0 without expert parallelism. Checked against the bytes an EP 2 run
    hands to all_to_all (tests/pretrain/test_moe.py)."""
    if ep == 1 or not cfg.is_moe:
        return 0.0
    routed = seq * mb // (tp if sequence_parallel else 1) * cfg.moe_top_k
    return routed * (4 * cfg.hidden_size * dtype_bytes + 2 * 4)


def zero3_live_parameters(cfg: ModelConfig, tp: int, max_live: float = 1e9, reuse_distance: float = 1e9) -> int:
    """Up to how many elements of partitioned parameters ZeRO-3 holds gathered at the end of a training forward,
    on a data-parallel size above 1 (at 1 the gathered tensor is the partition itself: no extra bytes).

    Measured (docs/FINDINGS.md, "ZeRO-3's live parameters"), not DeepSpeed's estimator's 4 x the largest module:
    from the second step, with a prefetch bucket (the shipped "auto"), the prefetcher gathers ahead up to
    `stage3_max_live_parameters`, and a module is kept after its forward when its backward reuse lies within
    `stage3_max_reuse_distance` elements of the trace (about half the distance in forward parameters) or the
    prefetcher skipped that reuse. Bounded here by the rank's non-persistent parameters and by max_live + half
    the reuse distance + one module; with the shipped 1e9 and 1e9 that is every parameter of a model under
    ~1.5e9 per model-parallel rank. tests/pretrain/test_plan.py checks the bound against real runs."""
    tensors = stage_parameters(cfg, tp, 1, 0)  # ZeRO-3 refuses PP
    persistent_up_to = zero_auto("stage3_param_persistence_threshold", cfg.hidden_size)  # whole on every rank
    partitioned = sum(n for _, n in tensors if n > persistent_up_to)
    return int(min(partitioned, max_live + reuse_distance / 2 + rank_params(cfg, tp, 1)["largest_module"]))


def layer_activation_bytes(cfg: ModelConfig, tp: int, seq: int, mb: int, mode: str, device_type: str,
                           sequence_parallel: bool = False) -> float:
    """Bytes one layer keeps for backward on one TP rank. The attention and MLP internals are split by TP; under
    sequence parallelism so is everything per hidden unit and per token (norm inputs, residuals, layer input)."""
    c = ACTIVATION_COEFFICIENTS[device_type][mode]
    d, sp = cfg.head_dim, tp if sequence_parallel else 1
    # a mixture of experts: each token passes k experts' MLPs (the dense MLP's coefficients), and the dispatcher
    # keeps its permuted copies (k per token, gathered over TP under SP) with their expert activations and routing
    # indices (MOE_COEFFICIENTS; none once the MoE layer is recomputed)
    k = cfg.moe_top_k if cfg.is_moe else 1
    ffn = k * cfg.moe_ffn_hidden_size if cfg.is_moe else cfg.ffn_hidden_size
    per_token = (c["token_h"] * cfg.hidden_size / sp + c["token_f"] * ffn / tp
                 + c["token_q"] * cfg.num_attention_heads * d / tp + c["token_kv"] * cfg.num_query_groups * d / tp
                 + c["token_heads"] * cfg.num_attention_heads / tp + c["token_one"] / sp)
    if cfg.is_moe and mode == "none":
        moe = MOE_COEFFICIENTS
        per_token += k * (moe["copy_h"] * cfg.hidden_size + moe["copy_f"] * cfg.moe_ffn_hidden_size / tp
                          + moe["copy_one"])
    return seq * mb * per_token + seq * c["position_d"] * d


def _model_states(p: PlanInput, psi: float, big: float, dp: int, experts: float = 0) -> dict:
    """Bytes per GPU of parameters, gradients, optimizer states, ZeRO-3's gathered set and communication
    buckets (DeepSpeed's accounting, module docstring), and what offload moves to the CPU. `experts` of the psi
    parameters are a mixture of experts' (pretrain/moe.py): under --ep ZeRO partitions them over the DP / EP ranks
    that hold the same experts, so a rank's share of their partitioned states is experts / (dp / ep)."""
    share = (psi - experts) / dp + experts / max(dp // p.ep, 1)  # the partitioned states' elements on this rank
    params = 2 * share if p.zero == 3 else 2 * psi
    grads16 = 0 if p.zero == 3 else 2 * share if p.zero == 2 else 2 * psi
    grads32 = 4 * share if p.zero >= 1 else 4 * psi
    optim = 12 * share
    cpu = 0.0
    if p.offload_optimizer:
        cpu += grads32 + optim
        grads32 = optim = 0
        if p.zero >= 2:  # each gradient streams to CPU as it is reduced
            grads16 = 0
    if p.offload_params:
        cpu += params
        params = 0
    buckets = 2 * p.reduce_bucket_size * (2 if p.overlap_comm else 1) if p.zero >= 1 else 0
    if p.zero == 3:
        buckets += 2 * p.prefetch_bucket_size
    return {"params": params, "grads16": grads16, "grads32": grads32, "optim": optim, "cpu": cpu,
            "gathered": 4 * big if p.zero == 3 else 0, "buckets": buckets}


def _activations(p: PlanInput, cfg: ModelConfig, grad_accum_steps: int) -> tuple[float, float]:
    """(bytes kept by the layers of the busiest stage, bytes of the output layer and loss) per GPU."""
    # 1F1B keeps up to pp micro-batches in flight on stage 0
    in_flight = min(p.pp, grad_accum_steps) if p.pp > 1 else 1
    seq = p.seq_length // p.cp  # a CP rank's chunk: every per-token activation (attention's are per head-chunk)
    layer = lambda mode: layer_activation_bytes(cfg, p.tp, seq, p.micro_batch_size, mode,  # noqa: E731
                                                p.device_type, p.sequence_parallel)
    acts = cfg.num_layers // p.pp * layer(p.recompute) * in_flight
    if p.recompute == "full":  # backward re-runs one layer at a time with everything kept
        acts += layer("none")
    return acts, loss_bytes(cfg, p.tp, seq, p.micro_batch_size, p.loss_chunks, p.device_type)


def cp_all_to_all_bytes(cfg: ModelConfig, tp: int, cp: int, seq: int, mb: int, dtype_bytes: int = 2) -> float:
    """Bytes one rank hands to all-to-all per transformer layer and micro-batch for context parallelism's attention
    (pretrain/context_parallel.py), forward and backward: q, k, v and the output, a rank's [seq/cp, mb, heads/tp,
    d] each, once per direction ((cp - 1) / cp of it leaves the rank; full or selective recompute, which re-runs
    core attention, adds a forward's worth: not counted here). Key/value groups that do not split into cp travel
    repeated up to one per query head. Checked against the bytes a CP 2 run moves
    (tests/pretrain/test_context_parallel.py)."""
    if cp == 1:
        return 0.0
    heads, groups = cfg.num_attention_heads // tp, cfg.num_query_groups // tp
    kv = groups if groups % cp == 0 else heads
    per_head = seq // cp * mb * cfg.head_dim * dtype_bytes
    return 2 * per_head * (2 * heads + 2 * kv)


def loss_bytes(cfg: ModelConfig, tp: int, seq: int, mb: int, chunks: int, device_type: str = "cuda") -> float:
    """Bytes of the final norm, output layer and loss at their peak on one rank: what is kept for backward (the
    norm's input and output, per token) plus the logits (loss_logits_bytes)."""
    ch = ACTIVATION_COEFFICIENTS[device_type]["head"]
    kept = seq * mb * (ch["token_h"] * cfg.hidden_size + ch["token_one"] + (8 if chunks > 1 else 0))
    return kept + loss_logits_bytes(cfg, tp, seq, mb, chunks, device_type)


def loss_logits_bytes(cfg: ModelConfig, tp: int, seq: int, mb: int, chunks: int, device_type: str = "cuda") -> float:
    """The loss's logits at their peak. Plain head: the fp32 softmax kept for backward, and alive beside it the
    bf16 logits while their fp32 copy is made (forward) or the bf16 logits gradient (backward): calibrated to H100
    peaks (bench/RESULTS.md). With chunks (pretrain/chunked_loss.py) one chunk's worth, alive only while that chunk
    is computed (the chunked loss also keeps 8 bytes per token: the max and sum of exponentials). Checked against
    the allocator's peak at vocabulary 32k, seq 2048 (tests/pretrain/test_plan.py)."""
    ch = ACTIVATION_COEFFICIENTS[device_type]["head"]
    return -(-seq * mb // chunks) * cfg.padded_vocab_size / tp * (ch["token_v"] + ch.get("logits_alive", 2))


def resolve_loss_chunks(value, cfg: ModelConfig, layout, recompute: str, sequence_parallel: bool,
                        device_type: str = "cuda") -> int:
    """--loss-chunks K|auto (the trainer's and the planner's) -> K, checked against a rank's sequence (its CP chunk;
    pretrain/chunked_loss.py); auto: auto_loss_chunks."""
    seq = cfg.seq_length // layout.cp
    if value == "auto":
        return auto_loss_chunks(cfg, layout.tp, seq, layout.micro_batch_size, recompute, device_type,
                                sequence_parallel)
    try:
        chunks = int(value)
    except ValueError:
        chunks = 0
    if not 1 <= chunks <= seq:
        raise LayoutError(f"--loss-chunks {value!r}: give a whole number from 1 (the plain loss) to a rank's sequence "
                          f"length {seq}" + (f" (--seq-length / --cp {layout.cp})" if layout.cp > 1 else "")
                          + ", or auto")
    return chunks


def auto_loss_chunks(cfg: ModelConfig, tp: int, seq: int, mb: int, recompute: str, device_type: str = "cuda",
                     sequence_parallel: bool = False) -> int:
    """--loss-chunks auto: the fewest chunks (a power of two, at most one per position) that keep the loss's logits
    within one transformer layer's activations at this recompute mode (but never below a quarter of those without
    recompute, so that full recompute does not ask for hundreds of chunks): the head then never sets the peak
    alone, and more chunks only add kernel launches. 1 when the plain head already fits (short sequences, small
    vocabularies)."""
    layer = max(layer_activation_bytes(cfg, tp, seq, mb, recompute, device_type, sequence_parallel),
                layer_activation_bytes(cfg, tp, seq, mb, "none", device_type, sequence_parallel) / 4)
    chunks = 1
    while chunks < seq and loss_logits_bytes(cfg, tp, seq, mb, chunks, device_type) > layer:
        chunks *= 2
    return min(chunks, seq)


def plan(p: PlanInput) -> dict:
    cfg = p.model.replace(seq_length=p.seq_length)
    world = p.nodes * p.gpus_per_node
    layout = validate_layout(cfg, world, p.tp, p.pp, p.zero, p.micro_batch_size, p.global_batch_size, p.recompute,
                             sequence_parallel=p.sequence_parallel, cp=p.cp, ep=p.ep)
    p = dataclasses.replace(p, loss_chunks=resolve_loss_chunks(p.loss_chunks, cfg, layout, p.recompute,
                                                               p.sequence_parallel, p.device_type))
    if p.gpu not in GPUS:
        raise LayoutError(f"--gpu {p.gpu!r} is not known; choose one of {', '.join(GPUS)}")
    if p.offload_params and p.zero != 3:
        raise LayoutError("--offload-params needs ZeRO-3 (DeepSpeed offloads parameters only in stage 3)")
    if p.offload_optimizer and p.zero == 0:
        raise LayoutError("--offload-optimizer needs ZeRO stage 1, 2 or 3")
    gpu = GPUS[p.gpu]
    counts = rank_params(cfg, p.tp, p.pp, p.ep)
    zero_ranks = layout.dp * layout.cp  # ZeRO partitions over DP x CP (pretrain/parallel.py)
    m = _model_states(p, counts["per_gpu"], counts["largest_module"], zero_ranks,
                      counts["experts_per_gpu"] if p.ep > 1 else 0)
    acts, head = _activations(p, cfg, layout.grad_accum_steps)
    # ZeRO-3 on DP > 1 holds more than DeepSpeed's 4 x largest module gathered at the forward's end (measured:
    # zero3_live_parameters); it is all released by the optimizer step.
    live = 2 * zero3_live_parameters(cfg, p.tp, p.zero3_max_live_parameters, p.zero3_max_reuse_distance) \
        if p.zero == 3 and zero_ranks > 1 else 0
    gathered_at_forward = max(m["gathered"], live)
    forward_peak = m["params"] + m["optim"] + (m["grads32"] if p.zero == 3 else 0) + gathered_at_forward + acts + head
    states = m["params"] + m["grads16"] + m["grads32"] + m["optim"] + m["gathered"]
    step_peak = states + m["buckets"]
    peak = max(forward_peak, step_peak)
    need = peak * (1 + FRAGMENTATION) + RESERVED_GIB * GiB

    flops_per_token = cfg.flops_per_token(p.seq_length)
    step_tokens = layout.global_batch_size * p.seq_length
    st = steptime.step_time(steptime.StepInput(
        cfg=cfg, tp=p.tp, pp=p.pp, dp=layout.dp, zero=p.zero, micro_batch_size=p.micro_batch_size,
        grad_accum=layout.grad_accum_steps, recompute=p.recompute, sequence_parallel=p.sequence_parallel,
        gpus_per_node=p.gpus_per_node, device=steptime.DEVICE_OF_GPU[p.gpu], intra=p.intra_link,
        inter=p.inter_link, overrides=p.link_overrides or {}, ep=p.ep))
    tokens_per_s = st["tokens_per_s"]
    all_to_all = cp_all_to_all_bytes(cfg, p.tp, p.cp, p.seq_length, p.micro_batch_size)
    expert_all_to_all = moe_all_to_all_bytes(cfg, p.tp, p.ep, p.seq_length // p.cp, p.micro_batch_size,
                                             p.sequence_parallel)
    if cfg.is_moe:
        st["warnings"].append(
            f"mixture of experts: the step time counts the active parameters' FLOPs ({cfg.moe_top_k} of "
            f"{cfg.num_experts} experts) as if the experts were evenly loaded and at the dense layers' matmul "
            f"efficiency, and the expert all-to-alls ({expert_all_to_all / 2**20:.1f} MiB per layer per "
            f"micro-batch per GPU) at the link's bandwidth, on the critical path; none of it measured on a GPU")
    if p.cp > 1:
        st["warnings"].append(f"--cp {p.cp}: the step time is CP 1's per-rank work (each rank computes 1/{p.cp} of "
                              f"a sample: about {p.cp}x too slow) without the attention all-to-alls "
                              f"({all_to_all / 2**20:.1f} MiB per layer per GPU); only the memory above models CP")
    gib = lambda x: round(x / GiB, 2)  # noqa: E731
    return {
        "model": {"parameters": cfg.num_params(), "active_parameters": cfg.active_params(),
                  "expert_parameters_per_gpu": counts["experts_per_gpu"], "parameters_per_gpu": counts["per_gpu"],
                  "largest_module": counts["largest_module"], "flops_per_token": flops_per_token},
        "layout": {**asdict(layout), "grad_accum_steps": layout.grad_accum_steps, "gpu": p.gpu,
                   "recompute": p.recompute, "sequence_parallel": p.sequence_parallel,
                   "offload_optimizer": p.offload_optimizer, "offload_params": p.offload_params},
        "memory_gib": {"parameters": gib(m["params"]), "gradients": gib(m["grads16"] + m["grads32"]),
                       "optimizer_states": gib(m["optim"]), "zero3_gathered": gib(m["gathered"]),
                       "zero3_live_at_forward_end": gib(gathered_at_forward),
                       "communication_buckets": gib(m["buckets"]), "activations": gib(acts),
                       "output_and_loss": gib(head), "loss_chunks": p.loss_chunks, "model_states": gib(states),
                       "cp_all_to_all_per_layer": gib(all_to_all),
                       "expert_all_to_all_per_layer": gib(expert_all_to_all),
                       "forward_peak": gib(forward_peak), "step_peak": gib(step_peak), "peak": gib(peak),
                       "with_reserve": gib(need), "device": gpu.memory_gib,
                       "cpu_offload_per_node": gib(m["cpu"] * p.gpus_per_node * 1.5),
                       # --async-save: a rank's snapshot is its checkpoint file's tensors, fp32 master + Adam's two
                       # moments of the elements it owns (pretrain/async_save.py), in host memory until written
                       "async_save_host_per_gpu": gib(12 * counts["per_gpu"] / zero_ranks) if p.async_save else 0.0,
                       "async_save_host_per_node": gib(12 * counts["per_gpu"] / zero_ranks * p.gpus_per_node)
                       if p.async_save else 0.0},
        "checkpoint_bytes_per_gpu": int(12 * counts["per_gpu"] / zero_ranks),
        "model_states_bytes": int(states),
        "fits": need <= gpu.memory_gib * GiB,
        "speed": {"mfu": round(st["mfu"], 4), "tokens_per_s_per_gpu": round(tokens_per_s / world),
                  "tokens_per_s": round(tokens_per_s), "step_s": round(st["step_s"], 4),
                  "breakdown_s": {k: round(v, 4) for k, v in st["breakdown_s"].items()},
                  "bubble_fraction": round(st["bubble_fraction"], 4), "warnings": st["warnings"],
                  "device_model": steptime.DEVICE_OF_GPU[p.gpu], "measured_error": st["measured_error"],
                  "tokens_per_step": step_tokens, "objective": cfg.objective,
                  # mlm: every position is computed (same FLOPs, same memory), the loss counts the masked share
                  "loss_tokens_per_step": round(step_tokens * objective(cfg.objective).loss_token_share(p.mask_prob))},
    }


def format_plan(r: dict) -> str:
    m, lay, s = r["memory_gib"], r["layout"], r["speed"]
    rows = [("parameters (bf16)", m["parameters"]), ("gradients (bf16 + fp32)", m["gradients"]),
            ("optimizer states (fp32 master + Adam)", m["optimizer_states"]),
            ("ZeRO-3 gathered, optimizer step", m["zero3_gathered"]),
            ("ZeRO-3 gathered, end of forward", m["zero3_live_at_forward_end"]),
            ("communication buckets", m["communication_buckets"]),
            (f"activations (recompute {lay['recompute']})", m["activations"]),
            ("output layer + loss", m["output_and_loss"])]
    md = r["model"]
    moe = (f" ({md['active_parameters'] / 1e9:.2f}B active per token; {md['expert_parameters_per_gpu'] / 1e9:.3f}B "
           f"of experts per GPU)") if md["active_parameters"] != md["parameters"] else ""
    out = [f"model: {md['parameters'] / 1e9:.2f}B parameters{moe}, {md['parameters_per_gpu'] / 1e9:.3f}B "
           f"on the busiest GPU; layout TP={lay['tp']} PP={lay['pp']}"
           + (f" CP={lay['cp']}" if lay.get("cp", 1) > 1 else "") + (f" EP={lay['ep']}" if lay.get("ep", 1) > 1
                                                                     else "")
           + f" DP={lay['dp']} ZeRO-{lay['zero_stage']} on "
           f"{lay['world_size']} x {lay['gpu']}, micro-batch {lay['micro_batch_size']}, global batch "
           f"{lay['global_batch_size']} ({lay['grad_accum_steps']} accumulation steps)",
           "memory per GPU (GiB):"]
    out += [f"  {name:<40} {v:>8.2f}" for name, v in rows]
    out += [f"  {'peak: end of forward':<40} {m['forward_peak']:>8.2f}",
            f"  {'peak: optimizer step':<40} {m['step_peak']:>8.2f}",
            f"  {'needed (+5% fragmentation, +2.5 reserved)':<40} {m['with_reserve']:>8.2f}  of {m['device']}"]
    if m["cpu_offload_per_node"]:
        out.append(f"  CPU memory per node for offload (x1.5 buffer): {m['cpu_offload_per_node']:.1f} GiB")
    if m["async_save_host_per_gpu"]:
        out.append(f"  host memory for --async-save (one snapshot in flight): {m['async_save_host_per_gpu']:.2f} GiB "
                   f"per GPU, {m['async_save_host_per_node']:.1f} GiB per node")
    out.append("fits: YES" if r["fits"] else "fits: NO (lower the micro-batch, recompute more, raise ZeRO stage or "
                                              "TP/PP, or offload)")
    b = s["breakdown_s"]
    out.append(f"step time, predicted from its parts ({s['device_model']} calibration; its measured error: "
               f"{s['measured_error']}):")
    parts = [("compute (all micro-batches)", b["compute"]), ("tensor-parallel collectives", b["tp_comm"]),
             ("pipeline send/receive", b["pp_comm"]), ("expert all-to-alls (--ep)", b.get("ep_comm", 0.0)),
             (f"pipeline bubble ({s['bubble_fraction']:.0%} of the pipeline)", b["pipeline_bubble"]),
             (f"data-parallel traffic not hidden (of {b['dp_comm_total']:.3f} s)", b["dp_comm_exposed"]),
             ("optimizer step", b["optimizer"])]
    out += [f"  {name:<52} {v:>8.3f} s" for name, v in parts]
    out.append(f"  {'step':<52} {s['step_s']:>8.3f} s for {s['tokens_per_step']:,} tokens")
    out.append(f"predicted MFU {s['mfu']:.1%}: {s['tokens_per_s_per_gpu']:,} tokens/s per GPU, "
               f"{s['tokens_per_s']:,} tokens/s in all")
    out += [f"warning: {w}" for w in s["warnings"]]
    note = objective(s["objective"]).plan_note(s["loss_tokens_per_step"])
    if note:
        out.append(note)
    return "\n".join(out)


def search(base: PlanInput, top: int = 10) -> list[dict]:
    """Every layout of base.model on base's GPUs and global batch (TP within a node, PP dividing the layers, ZeRO
    1/3 (1 with PP), micro-batch 1-16, recompute none/selective/full) that the trainer accepts and that fits,
    ranked by predicted tokens/s. Layouts the trainer refuses are skipped with its own reason."""
    if not base.global_batch_size:
        raise LayoutError("--search needs --global-batch-size (the batch the run is to train with)")
    cfg, world = base.model, base.nodes * base.gpus_per_node
    ranked = []
    for tp in (t for t in (1, 2, 4, 8) if t <= base.gpus_per_node and world % t == 0):
        for pp in (q for q in (1, 2, 4, 8, 16) if world % (tp * q) == 0 and q <= cfg.num_layers):
            for zero in ((1,) if pp > 1 else (1, 3)):
                for mb in (1, 2, 4, 8, 16):
                    for recompute in ("none", "selective", "full"):
                        p = dataclasses.replace(base, tp=tp, pp=pp, zero=zero, micro_batch_size=mb,
                                                recompute=recompute)
                        try:
                            r = plan(p)
                        except LayoutError:
                            continue
                        if r["fits"]:
                            ranked.append(r)
    ranked.sort(key=lambda r: -r["speed"]["tokens_per_s"])
    return ranked[:top]


def format_search(rows: list[dict]) -> str:
    out = ["| rank | TP | PP | DP | ZeRO | micro-batch x accum | recompute | peak GiB | step s | tokens/s | MFU | "
           "bubble | warnings |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lay, s = r["layout"], r["speed"]
        out.append(f"| {i} | {lay['tp']} | {lay['pp']} | {lay['dp']} | {lay['zero_stage']} | "
                   f"{lay['micro_batch_size']} x {lay['grad_accum_steps']} | {lay['recompute']} | "
                   f"{r['memory_gib']['with_reserve']:.1f} | {s['step_s']:.3f} | {s['tokens_per_s']:,} | "
                   f"{s['mfu']:.1%} | {s['bubble_fraction']:.0%} | {len(s['warnings'])} |")
    if not rows:
        out.append("no layout fits: more GPUs, offload (--offload-optimizer), or a smaller model")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", default="h100-80gb", help=f"one of: {', '.join(GPUS)}")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1, help="context-parallel size (as the trainer's --cp)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size (as the trainer's --ep)")
    ap.add_argument("--num-experts", type=int, default=0, help="a mixture of experts: experts per layer (0: dense)")
    ap.add_argument("--moe-top-k", type=int, default=2, help="experts per token")
    ap.add_argument("--moe-ffn-hidden-size", type=int, help="each expert's width (default: the preset's ffn)")
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--global-batch-size", type=int)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--recompute", default="selective")
    ap.add_argument("--sequence-parallel", action="store_true", help="megatron's sequence parallelism (--tp > 1)")
    ap.add_argument("--offload-optimizer", action="store_true")
    ap.add_argument("--offload-params", action="store_true")
    ap.add_argument("--reduce-bucket-size", type=float, default=5e7)
    ap.add_argument("--prefetch-bucket-size", type=float, default=5e7)
    ap.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary (default: the preset's)")
    ap.add_argument("--intra-link", choices=sorted(steptime.LINKS), help="link between a node's GPUs (default: "
                                                                          "the GPU's, NVLink)")
    ap.add_argument("--inter-link", choices=sorted(steptime.LINKS), default="ib-ndr400",
                    help="inter-node fabric per GPU")
    ap.add_argument("--inter-bus-gbs", type=float, help="override the inter-node bus bandwidth per GPU (GB/s)")
    ap.add_argument("--search", action="store_true",
                    help="rank every valid layout (TP, PP, ZeRO, micro-batch, recompute) that fits by predicted "
                         "tokens/s, for --global-batch-size")
    ap.add_argument("--objective", choices=list(OBJECTIVES), default="clm", help="as the trainer's --objective")
    ap.add_argument("--mask-prob", type=float, default=0.15, help="mlm: the share of tokens masked")
    ap.add_argument("--async-save", action="store_true",
                    help="report the host memory --async-save's snapshot takes (one per GPU while a save is written)")
    ap.add_argument("--loss-chunks", default="1", metavar="K|auto",
                    help="as the trainer's: the output layer and loss over this many pieces of the sequence")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(argv)
    moe = dict(num_experts=a.num_experts, moe_top_k=a.moe_top_k, moe_ffn_hidden_size=a.moe_ffn_hidden_size) \
        if a.num_experts else {}
    model = preset(a.model, objective=a.objective, **({"vocab_size": a.vocab_size} if a.vocab_size else {}), **moe)
    try:
        if a.search:
            base = PlanInput(model=model, nodes=a.nodes, gpus_per_node=a.gpus_per_node, gpu=a.gpu,
                             global_batch_size=a.global_batch_size, seq_length=a.seq_length,
                             sequence_parallel=a.sequence_parallel, intra_link=a.intra_link, inter_link=a.inter_link,
                             link_overrides={"inter.bus_gbs": a.inter_bus_gbs} if a.inter_bus_gbs else None)
            rows = search(base)
            print(json.dumps(rows, indent=1) if a.json else format_search(rows))
            return 0
        r = plan(PlanInput(model=model, nodes=a.nodes, gpus_per_node=a.gpus_per_node, gpu=a.gpu, tp=a.tp, pp=a.pp,
                           zero=a.zero, micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size,
                           seq_length=a.seq_length, recompute=a.recompute, sequence_parallel=a.sequence_parallel,
                           offload_optimizer=a.offload_optimizer,
                           offload_params=a.offload_params, reduce_bucket_size=a.reduce_bucket_size,
                           prefetch_bucket_size=a.prefetch_bucket_size, mask_prob=a.mask_prob,
                           async_save=a.async_save, cp=a.cp, ep=a.ep,
                           loss_chunks=a.loss_chunks,
                           intra_link=a.intra_link, inter_link=a.inter_link,
                           link_overrides={"inter.bus_gbs": a.inter_bus_gbs} if a.inter_bus_gbs else None))
    except LayoutError as e:
        print(f"plan: invalid layout: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1) if a.json else format_plan(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
