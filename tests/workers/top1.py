"""top1_correct and TokenAccuracy under tensor parallelism: every TP rank holds its slice of the same random
vocab-parallel logits (vocabulary padding masked to -inf, as the output layer leaves it); the result must equal
the argmax of the full logits, computed alone. Writes the comparison as JSON from rank 0."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from pretrain.model import ACCURACY, lm_loss, mask_vocab_padding, top1_correct  # noqa: E402
from pretrain.parallel import init_distributed, shutdown_distributed  # noqa: E402


def main():
    tp = int(os.environ["WORLD_SIZE"])
    init_distributed(tp, 1, seed=7)
    from megatron.core import parallel_state as ps

    s, b, vocab, padded = 24, 3, 250, 256
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(s, b, padded, generator=gen)
    full[..., vocab:] = float("-inf")
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    labels[:, ::3] = full.argmax(-1).t()[:, ::3]  # a third certainly right
    # a third the best of the first TP rank's slice only: right just where the global best lies there too
    labels[:, 1::3] = full[..., :padded // tp].argmax(-1).t()[:, 1::3]
    loss_mask = (torch.rand(b, s, generator=gen) < 0.7).float()
    local = full.chunk(tp, dim=-1)[ps.get_tensor_model_parallel_rank()].clone()
    mask_vocab_padding(local, vocab, padded)
    want = full.argmax(-1) == labels.t()
    wrong = (top1_correct(local, labels) != want).sum().reshape(1)
    torch.distributed.all_reduce(wrong)  # every rank must agree with the full argmax
    with ACCURACY.counting():
        lm_loss(local.clone(), labels, loss_mask)
    expected = ((want.t().float() * loss_mask).sum() / loss_mask.sum()).item()
    if torch.distributed.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"wrong": int(wrong), "hard_ones": int((~want[1::3]).sum()), "right": int(want.sum()),
                       "accuracy": ACCURACY.result, "expected": expected}, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
