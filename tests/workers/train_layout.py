"""Train the tiny model for a few steps under one parallel layout; rank 0 writes losses and grad norms.

Batches are the same token sequences whatever the layout: the m-th micro-batch of DP rank r takes sequences
[(m*dp + r)*b, (m*dp + r + 1)*b) of the step's global batch, the order megatron's sampler uses.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from pretrain.config import preset  # noqa: E402
from pretrain.engine import OptimConfig, build_engine, load_ds_config  # noqa: E402
from pretrain.parallel import init_distributed, validate_layout  # noqa: E402
from pretrain.memory import SavedActivations  # noqa: E402
from pretrain.step import train_step  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--recompute", default="none")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tie", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    cfg = preset("tiny", tie_embeddings=a.tie)
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = validate_layout(cfg, world, a.tp, a.pp, a.zero, a.micro_batch_size, a.global_batch_size, a.recompute)
    init_distributed(a.tp, a.pp, seed=7)
    from megatron.core import parallel_state as ps

    ds = {"zero_optimization": {"stage": a.zero}, "bf16": {"enabled": a.bf16}}
    engine = build_engine(cfg, layout, load_ds_config(ds, layout, clip_grad=1.0),
                          OptimConfig(lr=a.lr, weight_decay=0.1), a.recompute, seed=7)
    dp_rank, b = ps.get_data_parallel_rank(), layout.micro_batch_size
    gen = torch.Generator().manual_seed(123)
    losses, norms, activation_bytes = [], [], []
    param_dtype = str(next(engine.module.parameters()).dtype)
    for _ in range(a.steps):
        # Learnable sequences (arithmetic progressions mod vocab), so descending loss is visible in 5 steps.
        start = torch.randint(0, cfg.vocab_size, (layout.global_batch_size, 1), generator=gen)
        stride = torch.randint(1, 4, (layout.global_batch_size, 1), generator=gen)
        seqs = (start + stride * torch.arange(cfg.seq_length + 1)) % cfg.vocab_size

        def micro_batches(seqs=seqs):
            for m in range(layout.grad_accum_steps):
                start = (m * layout.dp + dp_rank) * b
                chunk = seqs[start:start + b]
                yield {"tokens": chunk[:, :-1], "labels": chunk[:, 1:],
                       "loss_mask": torch.ones(b, cfg.seq_length)}

        if not activation_bytes:  # the first step's forward passes
            meter = SavedActivations(engine.module)
            with meter.measure():
                r = train_step(engine, micro_batches())
            activation_bytes.append(meter.bytes)
        else:
            r = train_step(engine, micro_batches())
        losses.append(r.loss)
        norms.append(r.grad_norm)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:  # last PP stage owns the loss
        with open(a.out, "w") as f:
            json.dump({"losses": losses, "grad_norms": norms, "param_dtype": param_dtype,
                       "activation_bytes": activation_bytes[0]}, f)


if __name__ == "__main__":
    main()
