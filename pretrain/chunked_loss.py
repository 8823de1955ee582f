"""The output layer and the vocab-parallel cross-entropy over K chunks of the sequence (--loss-chunks K), so that
at most one chunk's logits are alive at once: the second memory wall of long context.

Why: the plain head (pretrain.model.OutputLayer + lm_loss) materialises [s, b, v/tp] logits in the model's dtype,
their fp32 copy, and keeps the fp32 softmax for backward: at vocabulary 128k and seq 8k that is 4 GiB / TP per
sample in fp32 alone, more than a transformer layer's activations. Here each chunk's logits are computed, reduced
to the loss and dropped in the forward; the backward recomputes them one chunk at a time from the hidden states
and the per-token max / sum-of-exponentials kept from the forward (8 bytes per token, no collective in the
backward), so the softmax is bit for bit the forward's.

Why by hand (no library does it for this layout): torch has no fused linear + cross-entropy; Liger-Kernel's
fused linear cross-entropy and Apple's cut-cross-entropy are CUDA/Triton-only and know nothing of a vocabulary
split across TP ranks. Calling megatron's ColumnParallelLinear once per chunk would work but, under ZeRO-3, gather
and release the output weight K times in the forward and again in the backward. So one autograd function takes
the hidden states and the weight, and reuses megatron's own VocabParallelCrossEntropy steps (max, predicted
logit, sum of exponentials, the gradient's one-hot update) per chunk, with the same TP all-reduces as
megatron's vocab_parallel_cross_entropy: the chunked loss equals the plain one to float rounding
(tests/pretrain/test_chunked_loss.py, 1e-6 relative in every gradient in fp32; in bf16 each chunk's weight-gradient
product is rounded to bf16 before the fp32 sum, within a bf16 ulp of the plain head's).

Known cost: under sequence parallelism the function keeps the all-gathered [s, b, h] hidden states for its
backward, where megatron's linear keeps this rank's [s/tp, b, h] and gathers again (TP times the hidden-size
bytes of one layer input; small beside the logits it saves, not yet in the planner).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility

from pretrain import context_parallel


def chunk_bounds(seq: int, chunks: int) -> list[slice]:
    """`chunks` slices of range(seq), as equal as can be (the first ones one longer)."""
    size, extra = divmod(seq, chunks)
    bounds, start = [], 0
    for i in range(chunks):
        end = start + size + (1 if i < extra else 0)
        bounds.append(slice(start, end))
        start = end
    return [b for b in bounds if b.stop > b.start]


def _vocab_range(local_vocab: int) -> tuple[int, int]:
    return VocabUtility.vocab_range_from_per_partition_vocab_size(
        local_vocab, parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size())


def _chunk_logits(hidden, weight, vocab_size: int, padded_vocab_size: int):
    """One chunk's vocab-parallel logits [c, b, v/tp] in the model's dtype, padding columns at -inf (as
    pretrain.model.OutputLayer)."""
    from pretrain.model import mask_vocab_padding

    return mask_vocab_padding(F.linear(hidden, weight), vocab_size, padded_vocab_size)


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """sum over tokens of loss_mask x cross-entropy(hidden @ weight.T, labels), computed chunk by chunk.
    hidden [s, b, h] (the whole sequence, on every TP rank), weight [v/tp, h], labels and loss_mask [s, b]."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_mask, chunks, vocab_size, padded_vocab_size, on_logits):
        group = parallel_state.get_tensor_model_parallel_group()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        maxes, sums = [], []
        for part in chunk_bounds(hidden.size(0), chunks):
            logits = _chunk_logits(hidden[part], weight, vocab_size, padded_vocab_size)
            if on_logits is not None:
                on_logits(logits, labels[part].t(), loss_mask[part].t())
            logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(logits)
            torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
            start, end = _vocab_range(logits.size(-1))
            *_, predicted, sum_exp, exp_logits = VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, labels[part], logits_max, start, end)
            del logits, exp_logits  # (the same tensor, exponentiated in place): one chunk's logits alive at a time
            torch.distributed.all_reduce(predicted, group=group)
            torch.distributed.all_reduce(sum_exp, group=group)
            losses = torch.log(sum_exp) - predicted
            total += (losses * loss_mask[part]).sum()
            maxes.append(logits_max)
            sums.append(sum_exp)
        ctx.save_for_backward(hidden, weight, labels, loss_mask, torch.cat(maxes), torch.cat(sums))
        ctx.chunks, ctx.vocab = chunks, (vocab_size, padded_vocab_size)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels, loss_mask, maxes, sums = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for part in chunk_bounds(hidden.size(0), ctx.chunks):
            x = hidden[part]
            softmax = _chunk_logits(x, weight, *ctx.vocab).float()
            # the forward's softmax, recomputed by its own steps: exp(logits - max) / sum of exponentials
            softmax -= maxes[part].unsqueeze(-1)
            torch.exp(softmax, out=softmax)
            softmax.div_(sums[part].unsqueeze(-1))
            start, end = _vocab_range(softmax.size(-1))
            target = labels[part]
            target_mask = (target < start) | (target >= end)
            masked_target = (target - start).masked_fill(target_mask, 0).reshape(-1)
            grad_2d, arange, update, grad = VocabParallelCrossEntropy.prepare_gradient_calculation_operands(
                softmax, target_mask)
            grad = VocabParallelCrossEntropy.calculate_gradients(grad_2d, arange, masked_target, update, grad,
                                                                 loss_mask[part].float() * grad_total)
            grad_low = grad.to(hidden.dtype)  # as the plain head's linear gets it from the fp32 cross-entropy
            del softmax, grad, grad_2d
            grad_hidden[part] = F.linear(grad_low, weight.t())
            grad_weight += grad_low.flatten(0, 1).t() @ x.flatten(0, 1)  # summed over chunks in fp32
            del grad_low
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None


def chunked_lm_loss(hidden, weight, labels, loss_mask, loss_tokens, chunks: int, vocab_size: int,
                    padded_vocab_size: int, sequence_parallel: bool, on_logits=None):
    """pretrain.model.lm_loss(OutputLayer(hidden), labels, loss_mask, loss_tokens) over `chunks` pieces of the
    sequence. hidden [s, b, h] (under sequence parallelism this rank's [s/tp, b, h]; under context parallelism
    of its chunk, labels and loss_mask staying whole: pretrain/context_parallel.py), weight this TP rank's
    [v/tp, h] rows of the output (or tied embedding) weight, labels and loss_mask [b, s]. on_logits(logits [c, b,
    v/tp], labels [b, c], loss_mask [b, c]) sees each chunk's logits before the loss (evaluation's accuracy)."""
    # What ColumnParallelLinear does to its input: all-gather the sequence under sequence parallelism (backward:
    # reduce-scatter), else identity whose backward all-reduces the TP ranks' partial input gradients.
    if sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    else:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    labels, loss_mask, divisor = context_parallel.loss_targets(labels, loss_mask, loss_tokens)
    labels_t, mask_t = labels.t().contiguous(), loss_mask.float().t().contiguous()
    total = _ChunkedVocabParallelCrossEntropy.apply(hidden, weight, labels_t, mask_t, chunks, vocab_size,
                                                    padded_vocab_size, on_logits)
    return total / divisor
