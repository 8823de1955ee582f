"""Fault injection and inspection for the test suite, kept out of the training loop.

PRETRAIN_INJECT_NAN_AT=3,4   the loss of steps 3 and 4 becomes non-finite (exercises the skip path)
PRETRAIN_DUMP_LOGITS=FILE    at the end, the full-vocabulary logits of the first micro-batch go to FILE
"""
from __future__ import annotations

import os

import torch

from pretrain.parallel import is_rank0


class TestHooks:
    def __init__(self, env=os.environ):
        self.nan_steps = {int(s) for s in env.get("PRETRAIN_INJECT_NAN_AT", "").split(",") if s.strip()}
        self.dump_logits_path = env.get("PRETRAIN_DUMP_LOGITS") or None

    def loss_hook(self, step: int):
        """A loss hook for `step` (1-based), or None."""
        return (lambda loss: loss * float("nan")) if step in self.nan_steps else None


@torch.no_grad()
def dump_logits(engine, dataset, micro_batch_size: int, path: str) -> None:
    """Full-vocabulary logits of the trained model, as sharded, on the first micro-batch of `dataset`, for
    comparison with an exported model."""
    from megatron.core import tensor_parallel

    from pretrain.compat import device
    from pretrain.data import micro_batches
    from pretrain.step import is_pipeline

    batch = next(micro_batches(dataset, 0, micro_batch_size, 0, 1, num_workers=0))
    if is_pipeline(engine):  # logits stay on the last stage: record the loss of this micro-batch instead
        feed = iter([(batch["tokens"], (batch["labels"], batch["loss_mask"]))] * 64)
        loss = float(engine.eval_batch(data_iter=feed))
        if is_rank0():
            torch.save({"tokens": batch["tokens"], "labels": batch["labels"], "loss": loss}, path)
        return
    engine.eval()
    logits = engine(batch["tokens"].to(device()))
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits.float().contiguous())
    engine.train()
    if is_rank0():
        torch.save({"tokens": batch["tokens"], "logits": logits.transpose(0, 1).cpu()}, path)
