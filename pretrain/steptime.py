"""Step time from its parts, for pretrain.plan: compute per pipeline stage, the 1F1B pipeline bubble, tensor-parallel
collectives, ZeRO/data-parallel traffic (with what DeepSpeed overlaps), the optimizer step.

One optimizer step on the busiest pipeline stage, m = gradient-accumulation micro-batches, p = PP stages:

  micro  = compute(stage's layers [+ head]) + host overhead per layer + TP collectives + PP send/receive
  pipe   = (m + p - 1) x micro            1F1B: p - 1 micro-batch slots of fill and drain (the bubble)
  dp     = ZeRO-0/1: gradient all-reduce once per step, overlapped with the last backward
           ZeRO-2:   gradient reduce-scatter every micro-batch, overlapped with its backward
           ZeRO-3:   parameter all-gather for forward and backward and gradient reduce-scatter every
                     micro-batch, overlapped with its compute (prefetch); ZeRO-1/2: updated parameters
                     all-gathered after the step (not overlapped)
  step   = pipe + exposed dp + optimizer

Compute is FLOPs (pretrain.config: 6N + attention per token, recompute adds its forward again) over the device's
peak times a measured efficiency that depends on the layer width (small matmuls run further from peak), plus a
measured host cost per layer pass (kernel launches, Python): on small models the latter dominates. Collectives
are alpha-beta: latency + bytes / bus bandwidth, ring volumes (all-reduce 2(n-1)/n, all-gather and
reduce-scatter (n-1)/n of the buffer). A collective whose group spans nodes runs at the inter-node fabric's
bandwidth per GPU. Bandwidths and latencies are named presets and can be overridden.

Calibration (DEVICES): h100 from the one-GPU runs in bench/results_h100.jsonl (no communication: compute
efficiency by width, optimizer time); cpu from this repository's 2-core CPU machines (bench/steptime_validation.py
measures and checks it). Every device names its measured error; the plan prints it next to the prediction.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from pretrain.config import ModelConfig


@dataclass(frozen=True)
class Device:
    peak_tflops: float  # dense peak in the training dtype (bf16 on GPUs; fp32 measured on the CPU)
    # (hidden size, achieved fraction of peak in a layer's matmuls and attention); interpolated in log(hidden)
    efficiency: tuple[tuple[int, float], ...]
    layer_overhead_s: float  # host time per layer per forward+backward pass (launches, Python, hooks)
    optimizer_s_per_param: float  # the optimizer step per locally updated parameter (memory bound)
    step_overhead_s: float = 0.0  # per optimizer step, whatever the size (bookkeeping, syncs)
    # ZeRO-3's parameter fetch/release hooks per layer per forward+backward pass, beyond its traffic (measured
    # with DP 1, where nothing is sent)
    zero3_layer_overhead_s: float = 0.0
    cores: int | None = None  # CPU: ranks on one machine share its cores
    intra: str = "nvlink-h100"  # the link between GPUs of one node
    measured_error: str = "not validated"


@dataclass(frozen=True)
class Link:
    bus_gbs: float  # achievable bus bandwidth per GPU, GB/s (what nccl-tests report as busbw)
    latency_s: float  # per collective


LINKS = {
    # NCCL all-reduce busbw on 8 x H100 SXM (NVLink 4, NVSwitch): ~360-480 GB/s at large messages.
    "nvlink-h100": Link(360.0, 15e-6),
    "nvlink-a100": Link(230.0, 15e-6),
    "pcie-gen5": Link(40.0, 20e-6),
    # Inter-node, per GPU: one 400 Gb/s NDR rail per GPU (~45 GB/s achieved), 200 Gb/s HDR, 100 GbE RoCE.
    "ib-ndr400": Link(45.0, 30e-6),
    "ib-hdr200": Link(22.0, 30e-6),
    "roce-100": Link(10.0, 40e-6),
    # gloo over loopback between processes of one CPU machine (measured: bench/steptime_validation.py)
    "gloo-loopback": Link(1.2, 1.5e-3),
}

DEVICES = {
    # Fitted by bench/steptime_validation.py to the default-kernel one-GPU runs (2026-11-23): efficiency
    # 0.79 h / (h + 2295), optimizer 6.13e-11 s per parameter (host costs are inside the efficiency).
    "h100": Device(peak_tflops=989.0, efficiency=((512, 0.144), (768, 0.198), (1024, 0.244), (2048, 0.373),
                                                  (4096, 0.506), (8192, 0.617), (16384, 0.693)),
                   layer_overhead_s=0.0, optimizer_s_per_param=6.13e-11,
                   # 1b, micro-batch 4, one GPU: ZeRO-3 0.968 s against ZeRO-1 0.201 s per step, over 22 layers
                   # (the 8x of issue 17; a fix there must update this)
                   zero3_layer_overhead_s=0.0349,
                   measured_error="one H100, 9 one-GPU runs, leave-one-out: mean |error| 9%, 8 of 9 within 11%, "
                                  "worst -44% (350m at seq 4096); communication terms not measured on GPUs"),
    # Fitted by bench/steptime_validation.py on a 2-core CPU, 2026-12-02 (one process: host cost per layer pass,
    # per step, and ZeRO-3's hooks; the FLOP rate does not matter at the tiny model's size). Run to run on that
    # machine these moved by up to 2x (1.2-2.4 ms per layer, 4-9 ms per step).
    "cpu": Device(peak_tflops=0.03, efficiency=((64, 1.0),), layer_overhead_s=1.8e-3, optimizer_s_per_param=0.0,
                  step_overhead_s=6e-3, zero3_layer_overhead_s=11e-3, cores=2, intra="gloo-loopback",
                  measured_error="2-core CPU, 7 layouts of 2-4 gloo ranks calibrated on one process: mean |error| "
                                 "32%, worst 68% (not within the 25% aimed at: bench/RESULTS.md)"),
}
# Not measured here: the H100's efficiencies at these GPUs' peaks (a guess the plan labels as such).
for _name, _peak, _link in (("a100", 312.0, "nvlink-a100"), ("l40s", 362.0, "pcie-gen5")):
    DEVICES[_name] = dataclasses.replace(DEVICES["h100"], peak_tflops=_peak, intra=_link,
                                         measured_error="not validated (H100 efficiencies at this GPU's peak)")
DEVICE_OF_GPU = {"h100-80gb": "h100", "h100-94gb": "h100", "h200-141gb": "h100", "a100-80gb": "a100",
                 "a100-40gb": "a100", "l40s-48gb": "l40s"}


@dataclass
class StepInput:
    cfg: ModelConfig  # seq_length is the run's
    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch_size: int
    grad_accum: int
    recompute: str = "none"
    sequence_parallel: bool = False
    gpus_per_node: int = 8
    device: str = "h100"
    intra: str | None = None  # default: the device's
    inter: str = "ib-ndr400"
    overrides: dict = field(default_factory=dict)  # Link fields by name: {"inter.bus_gbs": 25.0, ...}
    reduce_bucket: float = 5e7  # ZeRO's reduce_bucket_size (elements): gradients go out in collectives this big
    allreduce_bucket: float = 5e8  # DeepSpeed's allreduce/allgather bucket size without ZeRO / after the step


def ring_factor(op: str, n: int) -> float:
    """Bytes each rank sends per byte of the buffer in a ring collective of n ranks."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def collective_s(op: str, n: int, nbytes: float, link: Link, count: int = 1) -> float:
    """`count` collectives moving `nbytes` in all (a bucketed reduce pays the latency per bucket)."""
    return 0.0 if n <= 1 else count * link.latency_s + ring_factor(op, n) * nbytes / (link.bus_gbs * 1e9)


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """The share of a 1F1B step a stage idles: (p - 1) / (m + p - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def efficiency(device: Device, hidden: int) -> float:
    pts = sorted(device.efficiency)
    if hidden <= pts[0][0]:
        return pts[0][1]
    if hidden >= pts[-1][0]:
        return pts[-1][1]
    for (h0, e0), (h1, e1) in zip(pts, pts[1:]):
        if h0 <= hidden <= h1:
            w = math.log(hidden / h0) / math.log(h1 / h0)
            return e0 + w * (e1 - e0)
    raise AssertionError("unreachable")


def _links(s: StepInput, device: Device, slow: float) -> tuple[Link, Link]:
    """The presets with overrides; on an oversubscribed CPU a collective waits for its ranks to get a core."""
    intra, inter = LINKS[s.intra or device.intra], LINKS[s.inter]
    o = s.overrides
    intra = Link(o.get("intra.bus_gbs", intra.bus_gbs), o.get("intra.latency_s", intra.latency_s) * slow)
    inter = Link(o.get("inter.bus_gbs", inter.bus_gbs), o.get("inter.latency_s", inter.latency_s) * slow)
    return intra, inter


def step_time(s: StepInput) -> dict:
    """-> the breakdown in seconds per optimizer step, the step time, and what it implies (tokens/s, MFU)."""
    cfg, device = s.cfg, DEVICES[s.device]
    world = s.tp * s.pp * s.dp
    slow = max(1.0, world / device.cores) if device.cores else 1.0  # CPU ranks sharing cores
    intra, inter = _links(s, device, slow)
    compute, tp_comm, pp_comm = _micro_batch(s, device, slow, intra, inter)
    micro, m = compute + tp_comm + pp_comm, s.grad_accum
    pipe = (m + s.pp - 1) * micro
    overlapped, after, hidden_by, local_params = _data_parallel(s, compute, intra if world <= s.gpus_per_node
                                                                else inter)
    dp_exposed = max(0.0, overlapped - hidden_by) + after
    optimizer = local_params * device.optimizer_s_per_param * slow + device.step_overhead_s

    total = pipe + dp_exposed + optimizer
    step_tokens = m * s.micro_batch_size * s.dp * cfg.seq_length
    per_gpu = cfg.flops_per_token(cfg.seq_length) * step_tokens / total / world
    return {
        "step_s": total, "tokens_per_s": step_tokens / total,
        "mfu": per_gpu / (device.peak_tflops * 1e12),
        "breakdown_s": {"compute": m * compute, "tp_comm": m * tp_comm, "pp_comm": m * pp_comm,
                        "pipeline_bubble": (s.pp - 1) * micro, "dp_comm_exposed": dp_exposed,
                        "dp_comm_total": overlapped + after, "optimizer": optimizer},
        "bubble_fraction": bubble_fraction(s.pp, m), "measured_error": device.measured_error,
        "warnings": warnings(s),
    }


def _micro_batch(s: StepInput, device: Device, slow: float, intra: Link, inter: Link) -> tuple[float, float, float]:
    """(compute, TP collectives, PP send/receive) seconds of one micro-batch, forward + backward, on the busiest
    pipeline stage."""
    cfg = s.cfg
    seq, tokens, h = cfg.seq_length, s.micro_batch_size * cfg.seq_length, cfg.hidden_size
    rate = device.peak_tflops * 1e12 * efficiency(device, h) / slow
    layer_fwd = 2 * (cfg.layer_params() - 2 * h) * tokens + 4 * seq * cfg.num_attention_heads * cfg.head_dim * \
        s.micro_batch_size
    redo = {"none": 0.0, "full": 1.0, "selective": 2 * 3 * h * cfg.ffn_hidden_size * tokens / layer_fwd}[s.recompute]
    layers = math.ceil(cfg.num_layers / s.pp)
    head_fwd = 2 * cfg.padded_vocab_size * h * tokens
    flops = (layers * layer_fwd * (3 + redo) + head_fwd * 3) / s.tp  # FLOPs split by TP
    host = device.layer_overhead_s + (device.zero3_layer_overhead_s if s.zero == 3 else 0.0)
    compute = flops / rate + layers * host * slow

    # tensor parallel: 2 all-reduces (or all-gather + reduce-scatter under SP: the same volume) per layer in
    # forward, 2 in backward, 2 more per recomputed forward; the embedding's and the loss's
    tp_link = intra if s.tp <= s.gpus_per_node else inter
    act = tokens * h * 2  # bf16 activations
    n_tp = layers * (4 + 2 * (s.recompute == "full")) + 2
    tp_comm = n_tp * collective_s("all_reduce", s.tp, act, tp_link)
    pp_link = intra if s.tp * s.pp <= s.gpus_per_node else inter
    pp_comm = 2 * (pp_link.latency_s + act / s.tp / (pp_link.bus_gbs * 1e9)) if s.pp > 1 else 0.0
    return compute, tp_comm, pp_comm


def _data_parallel(s: StepInput, compute: float, link: Link) -> tuple[float, float, float, float]:
    """ZeRO/data-parallel traffic over the parameters this model-parallel rank holds: (seconds that overlap can
    hide, seconds after the step that it cannot, the compute that hides them, parameters the optimizer updates)."""
    from pretrain.plan import rank_params

    psi, m = rank_params(s.cfg, s.tp, s.pp)["per_gpu"], s.grad_accum
    layers = math.ceil(s.cfg.num_layers / s.pp)
    grad_bytes, param_bytes = 2 * psi, 2 * psi
    backward = 2 / 3 * compute  # what reduce can hide behind
    # DeepSpeed flushes a bucket when the next gradient would overflow it: about psi / bucket collectives, but at
    # most one per parameter tensor (6 a layer: 4 matrices, 2 norms; embedding, output layer, final norm)
    tensors = 6 * layers + 3
    buckets = min(tensors, math.ceil(psi / (s.allreduce_bucket if s.zero == 0 else s.reduce_bucket)))
    if s.zero <= 1:
        overlapped = collective_s("all_reduce", s.dp, grad_bytes, link, buckets)
        hidden_by = backward
    elif s.zero == 2:
        overlapped = m * collective_s("reduce_scatter", s.dp, grad_bytes, link, buckets)
        hidden_by = m * backward
    else:  # every partitioned weight (4 matrices a layer, embedding, output layer) fetched for forward and backward
        fetches = 2 * (4 * layers + 2)
        overlapped = m * (collective_s("all_gather", s.dp, 2 * param_bytes, link, fetches)
                          + collective_s("reduce_scatter", s.dp, grad_bytes, link, buckets))
        hidden_by = m * compute
    after = collective_s("all_gather", s.dp, param_bytes, link, math.ceil(psi / s.allreduce_bucket)) \
        if s.zero in (1, 2) else 0.0
    return overlapped, after, hidden_by, psi / s.dp if s.zero >= 1 else psi


def warnings(s: StepInput) -> list[str]:
    out = []
    bubble = bubble_fraction(s.pp, s.grad_accum)
    if s.pp > 1 and bubble > 0.2:
        out.append(f"pipeline bubble {bubble:.0%}: {s.grad_accum} micro-batch(es) per step through {s.pp} stages "
                   f"idle each stage {s.pp - 1}/{s.grad_accum + s.pp - 1} of the time; raise the global batch (or "
                   f"lower the micro-batch) to >= {4 * (s.pp - 1)} micro-batches, or lower --pp")
    if s.pp > 1 and s.grad_accum < s.pp:
        out.append(f"global batch too small for the pipeline: {s.grad_accum} micro-batch(es) cannot fill {s.pp} "
                   f"stages")
    if s.tp > s.gpus_per_node:
        out.append(f"TP {s.tp} spans nodes ({s.gpus_per_node} GPUs each): every layer's all-reduces cross the "
                   f"inter-node fabric; keep TP within a node and use PP or ZeRO across nodes")
    return out
