"""Context parallelism (--cp N): each sample's sequence is split into N equal chunks, one per CP rank, so that
activations (and the loss's logits) per rank shrink by N at long context.

How attention sees the whole sequence: DeepSpeed-Ulysses' all-to-all (deepspeed.sequence.layer.
DistributedAttention). Before core attention each CP rank trades its chunk of every head for the whole sequence
of 1/N of the heads; it attends over the whole sequence with the ordinary kernel and mask, and a second all-to-all
trades back. Chosen over ring attention (Megatron's through Transformer Engine, torchtitan's, OLMo-core's):
  - the document mask stays right by construction: every rank holds the whole sequence's document ids (they
    travel with the batch) and attends over the whole sequence, so documents crossing a chunk boundary need no
    per-block mask bookkeeping. Ring attention must mask each (query chunk, key chunk) block and, causal, skip or
    split blocks; with packed documents that is exactly what Megatron has left open (NVIDIA/Megatron-LM#6156).
  - the work is balanced by construction: each rank computes the full (causal or document) attention of 1/N of
    the heads, whatever the documents or the causal shape. A contiguous ring split gives the last rank N times the
    first's causal work, hence the zig-zag (2N-chunk) layouts of ring implementations. attention_work counts
    both (tests/pretrain/test_context_parallel.py).
  - traffic: 4 all-to-alls per layer (q, k, v, out), each moving (N-1)/N of a rank's [s/N, b, heads, d] tensor,
    so ~4 s b h / N elements per rank per layer, independent of N at fixed work per rank; a ring passes K and V
    N-1 times, 2 (N-1)/N s b h_kv elements, less under GQA (pretrain.plan reports the all-to-all figure).
  - the limit: N must divide the heads of a TP rank (pretrain.parallel checks it). Key/value groups that do not
    divide are repeated up to one per query head first (GQA's sharing is a memory saving, not part of the math).
Positions: RoPE uses each token's global position (or its position in its document), taken from the whole
sequence before the chunk is cut (pretrain.model.Block).

The loss: each CP rank computes its chunk's tokens; dividing by the loss tokens of the whole sample and
multiplying by N makes DeepSpeed's average over the DP x CP group (its data-parallel group:
pretrain/parallel.py) the true mean, as Megatron scales its loss by the CP size.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state


def size() -> int:
    return parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1


def rank() -> int:
    return parallel_state.get_context_parallel_rank() if size() > 1 else 0


def local(t: torch.Tensor, dim: int) -> torch.Tensor:
    """This CP rank's chunk of a whole-sequence tensor along `dim`."""
    n = size()
    if n == 1:
        return t
    chunk = t.size(dim) // n
    return t.narrow(dim, rank() * chunk, chunk)


def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The whole sequence from every CP rank's chunk along `dim` (no gradient: evaluation and dumps)."""
    n = size()
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    torch.distributed.all_gather(parts, t.contiguous(), group=parallel_state.get_context_parallel_group())
    return torch.cat(parts, dim=dim)


def loss_targets(labels, loss_mask, loss_tokens=None):
    """Whole-sample labels and loss mask [b, s] -> (this rank's labels, its loss mask, the divisor): the loss
    tokens of the whole sample (or the given global count) over CP, so that rank losses averaged over CP give
    the sample's mean (module docstring)."""
    divisor = loss_mask.float().sum().clamp(min=1.0) if loss_tokens is None else loss_tokens.float().reshape(())
    n = size()
    if n == 1:
        return labels, loss_mask, divisor
    return local(labels, 1), local(loss_mask, 1), divisor / n


class UlyssesAttention(torch.nn.Module):
    """Core attention over the whole sequence with heads split across CP ranks: DeepSpeed's DistributedAttention
    around `attend(q, k, v, mask) -> [s, b, heads, d]`, on megatron's [s/N, b, heads, d] layout."""

    def __init__(self, attend):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.exchange = DistributedAttention(attend, parallel_state.get_context_parallel_group(), scatter_idx=2,
                                             gather_idx=0)

    def forward(self, query, key, value, attention_mask=None):
        n, heads = size(), query.size(2)
        if key.size(2) % n:  # key/value groups that do not split into N: one per query head (module docstring)
            key, value = (t.repeat_interleave(heads // t.size(2), dim=2) for t in (key, value))
        return self.exchange(query, key, value, 1, None, attention_mask)


def attention_work(doc: torch.Tensor, causal: bool, heads: int, cp: int, split: str) -> list[int]:
    """Per CP rank, the (query, key) pairs its core attention scores, summed over its heads, counted on the real
    mask of a batch (document ids [b, s]; pretrain.model.document_mask). split "heads": this module's all-to-all,
    each rank the whole mask for heads / cp heads. "contiguous": a ring over contiguous sequence chunks, rank r
    the mask's rows of its chunk for every head (what zig-zag layouts exist to even out)."""
    from pretrain.model import document_mask

    mask = document_mask(doc, causal)  # [b, 1, s, s]
    if split == "heads":
        return [heads // cp * int(mask.sum())] * cp
    chunk = doc.size(1) // cp
    return [heads * int(mask[:, :, r * chunk:(r + 1) * chunk].sum()) for r in range(cp)]
