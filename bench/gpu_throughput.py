"""Training throughput on one device: our stack vs a plain PyTorch loop around HF LlamaForCausalLM.

Ours: pretrain.model (megatron-core layers, SDPA) under DeepSpeed (bf16, ZeRO stage as given, recompute as given).
Baseline: the same shape, batch and sequence in transformers' LlamaForCausalLM (SDPA attention), fp32 master
weights with bf16 autocast, torch's fused AdamW: what a user would write by hand.
Both sides get the same work: the same accumulation, recompute (the baseline has only whole-layer gradient
checkpointing, so "selective" and "full" both run it there, and the row says so) and --compile (each decoder
layer torch.compile'd). Each side runs in its own fresh process: a DeepSpeed engine stays alive after its run
(a backward hook holds it), which would inflate the other side's memory and make it run out early.
Reports tokens/s, model TFLOP/s per GPU (6N + attention, as pretrain.config.flops_per_token), MFU against the
device's dense bf16 peak (named in the output), peak memory, and the model states (parameters, gradients,
optimizer states) once the optimizer has stepped. Synthetic tokens.

  python bench/gpu_throughput.py --model 1b --seq-length 2048 --micro-batch-size 8 --zero 1
  python bench/gpu_throughput.py --model tiny --steps 2 --warmup 1   # CPU smoke run (CI)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import emit, single_rank_env  # noqa: E402
import torch  # noqa: E402

from pretrain.config import preset  # noqa: E402


MEASURED: dict = {}  # extra figures a run reports (GPU memory of the model states)
DS_CONFIG = None  # --ds-config


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


EOD = 0  # with --document-mask: documents of ~DOC_TOKENS tokens end with this id
DOC_TOKENS = 512


def _batches(cfg, b, s, device, documents=False):
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randint(1, cfg.vocab_size, (b, s + 1), generator=g)
        if documents:
            x[torch.rand(b, s + 1, generator=g) < 1 / DOC_TOKENS] = EOD
        x = x.to(device)
        yield {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(b, s, device=device)}


def _timed(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - t0) / steps


def run_ours(cfg, b, s, zero, recompute, steps, warmup, compile_layers=False, fuse_swiglu=False, gas=1,
             document_mask=False, cp=1, loss_chunks=1):
    """One process, or with --cp N the N context-parallel ranks of one sample (launched by torchrun)."""
    from pretrain.engine import OptimConfig, build_engine
    from pretrain.parallel import init_distributed, validate_layout
    from pretrain.step import train_step

    init_distributed(1, 1, cp=cp)
    layout = validate_layout(cfg, int(os.environ["WORLD_SIZE"]), 1, 1, zero, b, b * gas, recompute, cp=cp)
    if DS_CONFIG:  # a shipped config, filled as the trainer fills it ("auto" buckets from the hidden size)
        from pretrain.engine import load_ds_config

        ds = load_ds_config(DS_CONFIG, layout, clip_grad=1.0, hidden_size=cfg.hidden_size)
    else:
        ds = _inline_ds_config(b, gas, cp, zero)
    from pretrain.model import ModelOptions

    options = ModelOptions(recompute, document_eod=EOD if document_mask else None, loss_chunks=loss_chunks)
    engine = build_engine(cfg, layout, ds, OptimConfig(lr=1e-4), options, compile_layers=compile_layers,
                          fused_swiglu=fuse_swiglu)
    from pretrain.compat import device

    data = _batches(cfg, b, s, device(), documents=document_mask)
    losses = []
    sec = _timed(lambda: losses.append(train_step(engine, data).loss), steps, warmup)
    if not torch.cuda.is_available():  # CPU: the allocator's peak over one more step (the profiler's events)
        from pretrain.memory import peak_allocated_bytes

        MEASURED["peak_mem_gb"] = round(peak_allocated_bytes(lambda: train_step(engine, data)) / 2**30, 3)
    _model_states()
    if os.environ.get("BENCH_PROFILE"):
        _profile(lambda: train_step(engine, data))
    return sec, losses[-1]


def _inline_ds_config(b: int, gas: int, cp: int, zero: int) -> dict:
    """The config of the recorded rows (bench/results_h100.jsonl): large buckets, persistence 1e6."""
    return {"train_batch_size": b * gas * cp, "train_micro_batch_size_per_gpu": b, "gradient_accumulation_steps": gas,
          "bf16": {"enabled": True}, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
          "steps_per_print": 10**9,
          "zero_optimization": {"stage": zero, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e8,
                                "stage3_param_persistence_threshold": 1e6}}


def _profile(step, n: int = 3) -> None:
    """Top GPU kernels over n steps (torch.profiler), to see what stands between us and the peak."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        _sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def _model_states() -> None:
    """GPU memory between steps, after the optimizer has stepped (so Adam's states exist) and with no activation
    alive: parameters, gradients, optimizer states, buffers."""
    if torch.cuda.is_available():
        _sync()
        MEASURED["model_states_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)


def run_baseline(cfg, b, s, steps, warmup, gas=1, recompute="none", compile_layers=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretrain.hf import hf_config

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf = LlamaConfig(**{k: v for k, v in hf_config(cfg, "float32").items() if k not in ("architectures",
                                                                                       "model_type")})
    hf._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf).to(dev)
    if recompute != "none":  # transformers recomputes whole decoder layers only
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        MEASURED["recompute_ran"] = "full (whole layers)"
    if compile_layers:
        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(layer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type == "cuda")
    data = _batches(cfg, b, s, dev)
    losses = []

    def step():
        for _ in range(gas):
            batch = next(data)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                logits = model(input_ids=batch["tokens"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
            (loss / gas).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    sec = _timed(step, steps, warmup)
    _model_states()
    return sec, losses[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1b")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--ds-config", help="ours: this DeepSpeed config (e.g. ds_configs/zero3.json, its stage wins over "
                                       "--zero) instead of the recorded rows' inline one")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--which", choices=["both", "ours", "baseline"], default="both")
    p.add_argument("--json", help="append the result as a JSON line to this file")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (both sides); real runs accumulate, amortising the step")
    p.add_argument("--compile", action="store_true", help="both sides: torch.compile every transformer layer")
    p.add_argument("--fuse-swiglu", action="store_true", help="ours: megatron's fused SwiGLU")
    p.add_argument("--document-mask", action="store_true",
                   help=f"ours: --document-mask over documents of ~{DOC_TOKENS} tokens (the baseline packs without it)")
    p.add_argument("--cp", type=int, default=1, help="ours: context parallel over the WORLD_SIZE ranks of torchrun "
                                                     "(bench/context_sweep.py launches it)")
    p.add_argument("--loss-chunks", type=int, default=1, help="ours: the chunked output layer and loss")
    a = p.parse_args(argv)
    global DS_CONFIG
    if a.ds_config:
        import json

        DS_CONFIG = a.ds_config
        with open(a.ds_config) as f:
            a.zero = int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    single_rank_env(29611)
    cfg = preset(a.model, seq_length=a.seq_length)
    from pretrain.metrics import device_peak_tflops

    peak, name = device_peak_tflops()
    tokens = a.micro_batch_size * a.seq_length * a.grad_accum  # per optimizer step
    flops = cfg.flops_per_token(a.seq_length) * tokens
    result = {"model": a.model, "params_M": round(cfg.num_params() / 1e6, 1), "seq": a.seq_length,
              "micro_batch": a.micro_batch_size, "grad_accum": a.grad_accum, "zero": a.zero, "recompute": a.recompute,
              "device": name, "peak_bf16_tflops": peak, "date": time.strftime("%Y-%m-%d"), "compile": a.compile,
              "fuse_swiglu": a.fuse_swiglu, "document_mask": a.document_mask, "separate_processes": True,
              "cp": a.cp, "loss_chunks": a.loss_chunks, "ds_config": a.ds_config}
    if a.which == "both":  # each side in a fresh process of its own (see the module docstring)
        for which in ("ours", "baseline"):
            result[which] = _side_in_subprocess(argv if argv is not None else sys.argv[1:], which)
    else:
        result[a.which] = _measure(a, cfg, flops, tokens, peak)
    if isinstance(result.get("ours"), dict) and isinstance(result.get("baseline"), dict):
        result["ours_over_baseline"] = round(result["ours"]["tokens_per_s"] / result["baseline"]["tokens_per_s"], 3)
    if int(os.environ.get("RANK", 0)):  # the other ranks of a --cp run: rank 0 reports
        return 0
    return emit(result, a.json)


def _measure(a, cfg, flops: float, tokens: int, peak: float):
    """One side in this process: -> its figures, or "out of memory"."""
    if a.which == "ours":
        run = lambda: run_ours(cfg, a.micro_batch_size, a.seq_length, a.zero, a.recompute, a.steps,  # noqa: E731
                               a.warmup, a.compile, a.fuse_swiglu, a.grad_accum, a.document_mask, a.cp,
                               a.loss_chunks)
    else:
        run = lambda: run_baseline(cfg, a.micro_batch_size, a.seq_length, a.steps, a.warmup,  # noqa: E731
                                   a.grad_accum, a.recompute, a.compile)
    try:
        sec, loss = run()
    except torch.OutOfMemoryError:
        return "out of memory"
    tflops = flops / sec / 1e12
    return {"step_s": round(sec, 4), "tokens_per_s": round(tokens / sec), "tflops": round(tflops, 1),
            "mfu": round(tflops / peak, 3) if peak else None, "loss": round(loss, 3),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
            else None, **MEASURED}  # (per rank; tokens are the sample's, whatever --cp splits them into)


def _side_in_subprocess(argv: list[str], which: str):
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "side.jsonl")
        args = [x for i, x in enumerate(argv) if x != "--json" and (i == 0 or argv[i - 1] != "--json")]
        res = subprocess.run([sys.executable, os.path.abspath(__file__), *args, "--which", which, "--json", out])
        if res.returncode != 0:
            raise RuntimeError(f"the {which} side failed (exit code {res.returncode}); its output is above")
        with open(out) as f:
            return json.loads(f.read())[which]


if __name__ == "__main__":
    sys.exit(main())
