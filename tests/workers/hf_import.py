"""Import Hugging Face models (pretrain/hf.py) under one parallel layout, each into its own engine, and report
what the test compares with transformers: the full-vocabulary logits of a fixed batch, the loss of the first
training step on a fixed global batch, and a checkpoint saved straight after the import (for the round trip
through export). fp32 throughout, so the comparison bounds are fp32's."""
import argparse
import json
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from pretrain import checkpoint, hf  # noqa: E402
from pretrain.engine import OptimConfig, build_engine, load_ds_config, zero3_partitioning  # noqa: E402
from pretrain.hooks import full_logits  # noqa: E402
from pretrain.model import ModelOptions  # noqa: E402
from pretrain.parallel import init_distributed, shutdown_distributed, validate_layout  # noqa: E402
from pretrain.step import train_step  # noqa: E402

SEQ = 16


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--hf", nargs="+", required=True, help="Hugging Face model directories")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--ep", type=int, default=1, help="expert parallel (a mixture of experts)")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--import-only", action="store_true",
                   help="only import, and write each rank's memory in MiB (rss-<rank>.json): RSS before the engine "
                        "is built, once it is built, after the import, and the peak")
    p.add_argument("--out", required=True, help="directory for report.json, <name>-logits.pt and <name>-ck/")
    return p.parse_args()


def batch_seqs(vocab: int, n: int, seed: int) -> torch.Tensor:
    """n sequences of SEQ + 1 tokens (inputs and next-token labels); the test draws the same ones."""
    return torch.randint(0, vocab, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def import_one(hf_dir, a, layout_args):
    cfg = hf.model_config(hf_dir, seq_length=SEQ)
    layout = validate_layout(cfg, *layout_args, sequence_parallel=a.sequence_parallel, ep=a.ep)
    stage = {"stage": a.zero}
    if a.zero == 3:  # sized as the shipped config does, so that matrices are partitioned
        stage.update({k: "auto" for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                          "stage3_param_persistence_threshold")})
    ds = load_ds_config({"zero_optimization": stage, "bf16": {"enabled": False}}, layout, clip_grad=1.0, fp32=True,
                        hidden_size=cfg.hidden_size)
    options = ModelOptions(sequence_parallel=a.sequence_parallel)
    engine = build_engine(cfg, layout, ds, OptimConfig(lr=1e-3, weight_decay=0.1), options, seed=7)
    rss_built, reader = rss_mib(), hf.HFReader(hf_dir, cfg)
    checkpoint.load_states(engine, reader, layout, cfg.parameter_shapes(), load_optimizer=False)
    # The reader is still open: the safetensors pages it touched (mapped) are still counted in RSS.
    return cfg, layout, engine, {"built": rss_built, "imported": rss_mib()}


def main():
    a = parse()
    world = int(os.environ.get("WORLD_SIZE", 1))
    init_distributed(a.tp, a.pp, seed=7, ep=a.ep)
    from megatron.core import parallel_state as ps

    report = {}
    for hf_dir in a.hf:
        name = os.path.basename(os.path.normpath(hf_dir))
        rss_before = rss_mib()
        cfg, layout, engine, rss = import_one(hf_dir, a, (world, a.tp, a.pp, a.zero, 2, 4, "none"))
        if a.import_only:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            with open(os.path.join(a.out, f"rss-{torch.distributed.get_rank()}.json"), "w") as f:
                json.dump({"before": rss_before, **rss, "peak": peak}, f)
            continue
        owner = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 and \
            ps.get_pipeline_model_parallel_rank() == layout.pp - 1
        seqs = batch_seqs(cfg.vocab_size, 2, seed=1)
        logits = full_logits(engine, {"tokens": seqs[:, :-1], "labels": seqs[:, 1:],
                                      "loss_mask": torch.ones(len(seqs), SEQ)})
        if owner:
            torch.save(logits, os.path.join(a.out, f"{name}-logits.pt"))
        checkpoint.save(engine, os.path.join(a.out, f"{name}-ck"), 0, 0, layout, cfg.__dict__,
                        {"init_from_hf": hf_dir}, keep_last=1)
        step_seqs, b, dp = batch_seqs(cfg.vocab_size, 4, seed=2), layout.micro_batch_size, layout.dp
        dp_rank = ps.get_data_parallel_rank()
        micro = [step_seqs[(m * dp + dp_rank) * b:(m * dp + dp_rank + 1) * b] for m in range(layout.grad_accum_steps)]
        result = train_step(engine, iter([{"tokens": s[:, :-1], "labels": s[:, 1:], "loss_mask": torch.ones(b, SEQ)}
                                          for s in micro]))
        report[name] = {"first_loss": result.loss, **zero3_partitioning(engine)}
        torch.distributed.barrier()
    if not a.import_only and owner:
        with open(os.path.join(a.out, "report.json"), "w") as f:
            json.dump(report, f)
    torch.distributed.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main()
