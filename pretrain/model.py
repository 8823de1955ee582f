"""The GPT decoder, read top to bottom: embedding -> N transformer layers -> final norm -> output layer.

Built from megatron-core parts: VocabParallelEmbedding, megatron's TransformerLayer (from its local layer
spec with RMSNorm, SwiGLU and GQA, and our SDPA core attention), ColumnParallelLinear for the output layer and
vocab-parallel cross-entropy. Tensor parallelism lives inside those layers.

Why a flat list of stages instead of megatron's GPTModel: DeepSpeed's PipelineModule cuts a flat list of layers
into pipeline stages, while GPTModel owns its pipeline split through megatron's own schedules. A single list
serves both PP=1 (`GPT`, a plain module) and PP>1 (`build_pipeline`), with identical parameter names, so
checkpoints, export and initialisation do not care about the layout. (Megatron-DeepSpeed's GPTModelPipe does
the same.)

Hidden states are [sequence, batch, hidden], megatron's layout.
"""
from __future__ import annotations

import contextlib
import functools
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from pretrain.compat import apply_cpu_compat
from pretrain.config import ModelConfig
from pretrain import context_parallel, param_table, sharding
from pretrain.moe import moe_config
from pretrain.parallel import LayoutError

apply_cpu_compat()


@dataclass(frozen=True)
class ModelOptions:
    """How a run computes its model, beyond the shape (pretrain/config.py): chosen per run, never part of a
    checkpoint or an export, and the same model (same parameters, same names) whatever they are."""

    recompute: str = "none"  # none / selective (megatron's core_attn + mlp) / full (whole layers)
    # megatron's sequence parallelism (TP > 1): norms, dropout and residuals work on 1/TP of the sequence
    sequence_parallel: bool = False
    # --document-mask: each token attends only within its own document (EOD-separated) and positions restart at
    # every document start. The EOD id, or None for plain causal attention across the packed sample.
    document_eod: int | None = None
    # --loss-chunks: the output layer and the loss run over this many pieces of the sequence, each chunk's
    # logits recomputed in the backward (pretrain/chunked_loss.py); 1 = the plain head
    loss_chunks: int = 1


def transformer_config(cfg: ModelConfig, tp: int = 1, options: ModelOptions = ModelOptions()) -> TransformerConfig:
    """megatron-core's config for one layer. Our pipeline split is DeepSpeed's, so megatron sees PP=1."""
    recompute = options.recompute
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=cfg.add_bias, add_qkv_bias=cfg.qkv_bias, hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_std, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        sequence_parallel=options.sequence_parallel and tp > 1, params_dtype=torch.float32,
        # We initialise every weight ourselves, layout-independently (init_parameters below).
        perform_initialization=False, use_cpu_initialization=not torch.cuda.is_available(),
        # Fused kernels need Apex/TE; plain PyTorch paths are what runs everywhere.
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        # "selective": megatron's per-module recompute of core attention and the MLP. With SDPA/flash there is
        # no s x s score matrix left to save, so the MLP (the widest activations) is what is worth recomputing.
        recompute_granularity="selective" if recompute == "selective" else None,
        # (a mixture of experts' layer is megatron's "moe" module, which "mlp" does not recompute: measured, the
        # MoE layer then kept all it keeps without recompute; with "moe" none of it, as the dense MLP)
        recompute_modules=(["core_attn", "moe" if cfg.is_moe else "mlp"] if recompute == "selective" else None),
        **moe_config(cfg),
    )


class SDPAttention(MegatronModule):
    """Core attention through F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU).

    Drop-in for megatron's DotProductAttention, which materialises the [b, heads, s, s] score matrix. Causal
    unless the layer spec says otherwise. With --document-mask, megatron's `attention_mask` argument carries the
    [b, s] document ids (pretrain.model.document_ids): on GPU FlexAttention computes the masked attention from a
    block mask built from them (no s x s mask in memory; blocks of other documents are skipped), elsewhere SDPA
    takes the equivalent dense boolean mask (CPU tests; FlexAttention on CPU is checked against it).

    Under context parallelism (--cp) each rank holds a chunk of the sequence; an all-to-all gives it the whole
    sequence of some heads for the same computation (pretrain/context_parallel.py).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None, **_):
        super().__init__(config=config)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.causal = attn_mask_type == AttnMaskType.causal
        self.context_parallel = context_parallel.UlyssesAttention(self._attend) if context_parallel.size() > 1 \
            else None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        attend = self.context_parallel or self._attend
        out = attend(query, key, value, attention_mask)
        return out.reshape(out.size(0), out.size(1), -1)

    def _attend(self, query, key, value, attention_mask=None):
        """[s, b, heads, d] queries, keys and values of the whole sequence -> [s, b, heads, d]."""
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = q.size(1) != k.size(1)
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with rng:  # heads differ across TP ranks, so their dropout masks must too (megatron's TP stream)
            if attention_mask is None:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal,
                                                     scale=self.softmax_scale, enable_gqa=gqa)
            elif q.is_cuda and dropout_p == 0:  # FlexAttention has no dropout
                out = _flex_attention()(q, k, v, block_mask=document_block_mask(attention_mask, self.causal),
                                        scale=self.softmax_scale, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(attention_mask, self.causal),
                                                     dropout_p=dropout_p, scale=self.softmax_scale,
                                                     enable_gqa=gqa)
        return out.permute(2, 0, 1, 3)


# ------------------------------------------------------------------------------------------ document masking
def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] token ids -> [b, s] int32 document index within each sample: a document ends with its EOD, so
    the token after an EOD starts the next one (the first document may have begun in an earlier sample)."""
    ends = (tokens == eod).to(torch.int32)
    return (torch.cumsum(ends, dim=1, dtype=torch.int32) - ends).contiguous()


def document_positions(doc: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> [b, s] position of each token within its document (0 at every document start)."""
    s = doc.size(1)
    idx = torch.arange(s, device=doc.device).expand_as(doc)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - first


def document_mask(doc: torch.Tensor, causal: bool) -> torch.Tensor:
    """The dense [b, 1, s, s] boolean mask (True = may attend) of document masking."""
    mask = doc[:, None, :, None] == doc[:, None, None, :]
    if causal:
        s = doc.size(1)
        mask = mask & torch.ones(s, s, dtype=torch.bool, device=doc.device).tril()
    return mask


_BLOCK_MASK: list = []  # [(document-id tensor, causal, BlockMask)] of the last micro-batch


def document_block_mask(doc: torch.Tensor, causal: bool):
    """FlexAttention's BlockMask for `doc`, built once per micro-batch: every layer of a forward pass gets the same
    document-id tensor object, so the last one is kept. Keyed by object identity while holding a reference, never
    by address: a freed tensor's memory is reused by the next micro-batch's ids, and an address key would hand
    that micro-batch the previous one's mask. (A recompute sees a detached copy and rebuilds the mask.)"""
    from torch.nn.attention.flex_attention import create_block_mask

    if not (_BLOCK_MASK and _BLOCK_MASK[0][0] is doc and _BLOCK_MASK[0][1] == causal):
        def mask_mod(b, h, q_idx, kv_idx):
            same = doc[b, q_idx] == doc[b, kv_idx]
            return same & (q_idx >= kv_idx) if causal else same

        mask = create_block_mask(mask_mod, doc.size(0), None, doc.size(1), doc.size(1), device=doc.device)
        _BLOCK_MASK[:] = [(doc, causal, mask)]
    return _BLOCK_MASK[0][2]


@functools.cache
def _flex_attention():
    """torch.compile'd flex_attention (the eager one is a slow reference), compiled once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm as megatron's spec builds a norm (config, hidden_size, eps), also under sequence
    parallelism, which megatron's torch-norm wrapper refuses (it needs Apex or Transformer Engine otherwise):
    each TP rank then normalises its own part of the sequence, so the weight's gradient is the sum over TP ranks,
    which copy_to_tensor_model_parallel_region (identity forward, all-reduce backward) gives it."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        self.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        weight = self.weight
        if self.sequence_parallel:
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def layer_spec(causal: bool = True, num_experts: int = 0):
    """megatron-core's local GPT layer (RMSNorm, SwiGLU MLP, GQA self-attention) with SDPA core attention (causal,
    or bidirectional for an encoder) and our RMSNorm (the same function as megatron's torch-norm wrapper, and it
    works under sequence parallelism). num_experts > 0: the MLP is megatron's MoELayer with SequentialMLP experts
    (its grouped GEMM needs the grouped_gemm package or Transformer Engine; pretrain/moe.py)."""
    spec = get_gpt_layer_local_spec(num_experts=num_experts or None, moe_grouped_gemm=False,
                                    normalization="RMSNorm")
    attention = spec.submodules.self_attention
    attention.submodules.core_attention = SDPAttention
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask}
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


class Embedding(nn.Module):
    """Token ids [b, s] -> hidden [s, b, h] (under sequence parallelism this rank's [s/tp, b, h]; under context
    parallelism of its sequence chunk); the vocabulary is split across TP ranks. With document masking the output
    is (hidden, document ids [b, s] of the whole sequence): every later stage needs the ids, and they travel with
    the activations (between pipeline stages too)."""

    def __init__(self, cfg: ModelConfig, tconfig: TransformerConfig, document_eod: int | None = None):
        super().__init__()
        self.sequence_parallel = tconfig.sequence_parallel
        # Under sequence parallelism the partial embeddings are reduce-scattered along the sequence ([s/tp, b, h])
        # instead of all-reduced, as megatron's LanguageModelEmbedding does.
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            cfg.padded_vocab_size, cfg.hidden_size, init_method=tconfig.init_method, config=tconfig,
            reduce_scatter_embeddings=self.sequence_parallel)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.vocab_size, self.padded_vocab_size = cfg.vocab_size, cfg.padded_vocab_size  # for tied logits
        self.document_eod = document_eod

    def forward(self, tokens, doc=None):
        # document ids given with the tokens (--objective sft: from the data's index, pretrain/sft_data.py; the
        # pipeline engine passes both as one tuple) take the place of ids found from EOD tokens
        tokens, doc = tokens if isinstance(tokens, tuple) else (tokens, doc)
        if doc is None and self.document_eod is not None:
            doc = document_ids(tokens, self.document_eod)  # from the whole sequence, before a CP rank's chunk
        hidden = self.word_embeddings(context_parallel.local(tokens, 1))
        if self.sequence_parallel:  # already [s/tp, b, h]; each TP rank holds other tokens: its own dropout
            with tensor_parallel.get_cuda_rng_tracker().fork():
                hidden = self.dropout(hidden)
        else:
            hidden = self.dropout(hidden.transpose(0, 1).contiguous())
        return hidden if doc is None else (hidden, doc.to(torch.int32).contiguous())


class Block(nn.Module):
    """One megatron TransformerLayer with RoPE; `recompute="full"` recomputes the whole layer in backward. Takes and
    returns hidden [s, b, h], or (hidden, document ids) with document masking (positions then restart at every
    document start)."""

    def __init__(self, cfg: ModelConfig, tconfig: TransformerConfig, layer_number: int, recompute: str = "none"):
        super().__init__()
        self.layer = build_module(layer_spec(cfg.causal, cfg.num_experts), config=tconfig, layer_number=layer_number)
        self.rotary = RotaryEmbedding(kv_channels=cfg.head_dim, rotary_percent=1.0, rotary_base=cfg.rope_theta,
                                      use_cpu_initialization=not torch.cuda.is_available())
        if cfg.rope_scaling:  # Llama 3.1's scaled frequencies (megatron's function is transformers' formula)
            s = cfg.rope_scaling
            self.rotary.inv_freq = self.rotary._apply_scaling(
                self.rotary.inv_freq, factor=s["factor"], low_freq_factor=s["low_freq_factor"],
                high_freq_factor=s["high_freq_factor"],
                original_max_position_embeddings=s["original_max_position_embeddings"])
        self.recompute = recompute
        # Under sequence parallelism this rank holds 1/tp of the sequence; attention sees all of it.
        self.seq_factor = tconfig.tensor_model_parallel_size if tconfig.sequence_parallel else 1

    def _layer(self, hidden, rotary_pos_emb, doc=None):
        # Dropout and residuals in the sequence-parallel region act on this rank's own tokens (megatron's
        # TransformerBlock forks the TP RNG stream around its layers for the same reason).
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.seq_factor > 1 else contextlib.nullcontext()
        with rng:
            return self.layer(hidden, attention_mask=doc, rotary_pos_emb=rotary_pos_emb)[0]

    def forward(self, x, doc=None):
        # GPT passes hidden and document ids as two arguments; DeepSpeed's PipelineModule passes one tuple. Two
        # top-level tensors matter under ZeRO-3, where each Block is a leaf (pretrain/engine.py): torch's full
        # backward hook, which DeepSpeed uses to reduce a leaf's gradients, sees only top-level tensor inputs; given
        # one tuple it found none, fired before the layer's backward instead of after it, and the recomputed
        # backward then met released parameters (issue 32; TP 2 x DP 2, full recompute, document mask).
        hidden, doc = x if isinstance(x, tuple) else (x, doc)
        seq = hidden.size(0) * self.seq_factor * context_parallel.size()  # the whole sequence
        # the whole sequence's table: megatron would cut its own zig-zag CP share, and CP ranks here hold contiguous
        # chunks (and document positions need every row); the chunk is taken below
        rotary_pos_emb = self.rotary(seq, packed_seq=True)  # [s, 1, 1, d]
        if doc is not None:  # per-token positions: [s, b, 1, d]
            rotary_pos_emb = rotary_pos_emb[:, 0, 0][document_positions(doc).t()].unsqueeze(2)
        rotary_pos_emb = context_parallel.local(rotary_pos_emb, 0)  # a CP rank's chunk: its global positions
        if self.recompute == "full" and self.training:
            # megatron's checkpoint replays its RNG tracker, so dropout is identical in the recompute.
            out = tensor_parallel.checkpoint(self._layer, False, hidden, rotary_pos_emb, doc)
        else:
            out = self._layer(hidden, rotary_pos_emb, doc)
        return out if doc is None else (out, doc)


def apply_speedups(model: nn.Module, compile_layers: bool = False, fused_swiglu: bool = False) -> None:
    """Opt-in GPU kernels. fused_swiglu: megatron's SwiGLU fusion (a torch.compile'd kernel; it also keeps less
    for backward). compile_layers: torch.compile each transformer layer (fuses RMSNorm, RoPE and the residual
    adds that the local spec runs as separate kernels). On one H100, 1b / seq 2048 / ZeRO-1 went from 41% to 50%
    MFU with both plus micro-batch 8 (bench/RESULTS.md)."""
    for m in model.modules():
        if isinstance(m, Block):
            if fused_swiglu:
                m.layer.config.bias_activation_fusion = True  # read at forward time by megatron's MLP
            if compile_layers:
                m._layer = torch.compile(m._layer)


class FinalNorm(nn.Module):
    """The last norm; drops the document ids that travelled with the hidden states."""

    def __init__(self, cfg: ModelConfig, tconfig: TransformerConfig):
        super().__init__()
        self.norm = RMSNorm(tconfig, cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, x, doc=None):
        return self.norm(x[0] if isinstance(x, tuple) else x)


class OutputLayer(nn.Module):
    """hidden [s, b, h] -> this TP rank's slice of the logits [s, b, vocab/tp]. Under sequence parallelism the
    column-parallel projection all-gathers the sequence first (megatron's layer does it from the config).

    With --loss-chunks K > 1 GPT hands it the labels too and it returns the loss, computed chunk by chunk
    (pretrain/chunked_loss.py) inside this module's forward, so that ZeRO-3 gathers the weight once for all
    chunks. In a pipeline (which cannot pass labels to a layer) it hands the hidden states on and PipelineLoss
    projects them."""

    def __init__(self, cfg: ModelConfig, tconfig: TransformerConfig, tied_embedding: Embedding | None = None,
                 loss_chunks: int = 1, in_pipeline: bool = False):
        super().__init__()
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, cfg.padded_vocab_size, config=tconfig, init_method=tconfig.init_method,
            bias=False, gather_output=False, skip_weight_param_allocation=tied_embedding is not None)
        # A plain attribute, not a submodule: the tied weight is registered once, under the embedding.
        self._tied = [tied_embedding] if tied_embedding is not None else []
        self.sequence_parallel = tconfig.sequence_parallel
        self.vocab_size, self.padded_vocab_size = cfg.vocab_size, cfg.padded_vocab_size
        self.loss_chunks, self.in_pipeline = loss_chunks, in_pipeline

    @property
    def projection_weight(self):
        """This TP rank's [v/tp, h] rows of the output weight (the embedding's when tied)."""
        return self._tied[0].word_embeddings.weight if self._tied else self.output_layer.weight

    def forward(self, hidden, labels=None, loss_mask=None, loss_tokens=None):
        if labels is not None:
            return head_loss(self, hidden, labels, loss_mask, loss_tokens, self.loss_chunks)
        if self.loss_chunks > 1 and self.in_pipeline:
            return hidden  # projected by the pipeline's loss_fn (PipelineLoss)
        return self.logits(hidden)

    def logits(self, hidden):
        weight = self._tied[0].word_embeddings.weight if self._tied else None
        return mask_vocab_padding(self.output_layer(hidden, weight=weight)[0], self.vocab_size,
                                  self.padded_vocab_size)


def mask_vocab_padding(logits, vocab_size: int, padded_vocab_size: int):
    """-inf in the columns past the tokenizer's vocabulary (this TP rank's share of them): the padding rows are
    never a target and are dropped on export, so they must not take probability mass either. Without this, a
    model imported from Hugging Face computes a different loss than transformers does (the zero rows' logits join
    every softmax), and an exported model a different one than was trained. In place on the projection's output
    (its backward does not need it); the masked columns' gradient is zero."""
    if vocab_size == padded_vocab_size:
        return logits
    local = padded_vocab_size // parallel_state.get_tensor_model_parallel_world_size()
    first = vocab_size - parallel_state.get_tensor_model_parallel_rank() * local
    if first < local:
        logits[..., max(first, 0):] = float("-inf")
    return logits


class TokenAccuracy:
    """Top-1 accuracy over the loss-counted tokens (the next token for clm, the masked ones for mlm), counted by
    lm_loss inside `counting()` (evaluation only: training pays nothing). Every rank that computes a loss counts;
    the counts are summed over all ranks at the end, where the TP ranks' equal counts cancel in the ratio (under
    PP only the last stage counts)."""

    def __init__(self):
        self.counts = None  # [correct, total] while counting
        self.result = float("nan")

    @contextlib.contextmanager
    def counting(self):
        """Count inside the block; afterwards `result` holds the accuracy over every rank (all must call it)."""
        from pretrain.compat import device

        self.counts = torch.zeros(2, dtype=torch.float64, device=device())  # stays there: one host sync, at the end
        try:
            yield self
        finally:
            self.result, self.counts = self._reduce(self.counts), None

    def add(self, logits, labels, loss_mask) -> None:
        mask = loss_mask.t().float()
        hit = (top1_correct(logits, labels).float() * mask).sum()
        self.counts += torch.stack([hit, mask.sum()]).double()

    @staticmethod
    def _reduce(counts) -> float:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.all_reduce(counts)
        return (counts[0] / counts[1]).item() if counts[1] > 0 else float("nan")


ACCURACY = TokenAccuracy()


@torch.no_grad()
def top1_correct(logits, labels):
    """Vocab-parallel logits [s, b, v/tp] and labels [b, s] -> [s, b] bool: the label's logit is the largest over
    the whole vocabulary (all TP ranks; a tie counts as correct). Two all-reduces of [s, b] over TP."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    best = logits.max(dim=-1).values.float()
    width = logits.size(-1)
    local = labels.t() - parallel_state.get_tensor_model_parallel_rank() * width
    here = (local >= 0) & (local < width)
    label_logit = logits.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1).float()
    label_logit = torch.where(here, label_logit, torch.zeros_like(label_logit))
    if tp > 1:
        torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(label_logit, group=group)
    return label_logit >= best


def lm_loss(logits, labels, loss_mask, loss_tokens=None):
    """Cross-entropy summed over unmasked tokens, divided by this micro-batch's unmasked tokens (a mean), or by
    `loss_tokens` when given: the global batch's loss tokens per micro-batch per DP rank, which makes DeepSpeed's
    mean over micro-batches and DP ranks the mean over every loss token of the global batch
    (pretrain.step.global_loss_tokens). Logits are vocab-parallel [s, b, v/tp], labels [b, s].
    megatron's vocab_parallel_cross_entropy works in place: fp32 logits are overwritten (bf16 ones are copied by
    .float() first), so a caller that needs the logits afterwards must not compute the loss on them."""
    labels, loss_mask, divisor = context_parallel.loss_targets(labels, loss_mask, loss_tokens)
    if ACCURACY.counts is not None:
        ACCURACY.add(logits, labels, loss_mask)
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous()).t()
    return (losses * loss_mask.float()).sum() / divisor


def head_loss(head, hidden, labels, loss_mask, loss_tokens=None, chunks: int = 1):
    """The loss of the final hidden states [s, b, h] through `head`'s output weight: an OutputLayer, or in a
    pipeline with tied embeddings the last stage's copy of the Embedding. chunks > 1: pretrain/chunked_loss.py."""
    if chunks == 1:
        return lm_loss(head_logits(head, hidden), labels, loss_mask, loss_tokens)
    from pretrain.chunked_loss import chunked_lm_loss

    weight = head.projection_weight if isinstance(head, OutputLayer) else head.word_embeddings.weight
    return chunked_lm_loss(hidden, weight, labels, loss_mask, loss_tokens, chunks, head.vocab_size,
                           head.padded_vocab_size, head.sequence_parallel,
                           on_logits=ACCURACY.add if ACCURACY.counts is not None else None)


def head_logits(head, hidden):
    return head.logits(hidden) if isinstance(head, OutputLayer) else _tied_logits(head, hidden)


class PipelineLoss:
    """DeepSpeed PipelineModule's loss_fn: labels travel as (labels, loss_mask[, loss_tokens]). With --loss-chunks
    the last stage hands over the final hidden states instead of logits and the loss projects them chunk by chunk
    through `head`, the module on the last stage that owns the output weight (set by build_pipeline)."""

    def __init__(self, chunks: int = 1):
        self.chunks, self.head = chunks, None

    def __call__(self, outputs, labels_and_mask):
        if self.chunks == 1:
            return lm_loss(outputs, *labels_and_mask)
        return head_loss(self.head, outputs, *labels_and_mask, chunks=self.chunks)

    def logits(self, outputs):
        """The logits of what the last stage returned (evaluation's return_logits, sampling)."""
        return outputs if self.chunks == 1 else head_logits(self.head, outputs)


class GPT(nn.Module):
    """The whole model on one pipeline stage. Children are named "0".."L+2" exactly as in PipelineModule."""

    def __init__(self, cfg: ModelConfig, tp: int = 1, options: ModelOptions = ModelOptions()):
        super().__init__()
        self.cfg = cfg
        tconfig = transformer_config(cfg, tp, options)
        embedding = Embedding(cfg, tconfig, options.document_eod)
        stages = [embedding]
        stages += [Block(cfg, tconfig, i + 1, options.recompute) for i in range(cfg.num_layers)]
        head = OutputLayer(cfg, tconfig, embedding if cfg.tie_embeddings else None, options.loss_chunks)
        stages += [FinalNorm(cfg, tconfig), head]
        for i, stage in enumerate(stages):
            self.add_module(str(i), stage)
        # Under ZeRO-3 a module's forward gathers only its own parameters: the output layer also uses the tied
        # embedding weight, and the chunked loss its child linear's weight without calling the child.
        if cfg.tie_embeddings:
            self._register_external_for_zero3(head, embedding.word_embeddings.weight)
        elif options.loss_chunks > 1:
            self._register_external_for_zero3(head, head.output_layer.weight)

    @staticmethod
    def _register_external_for_zero3(module, param):
        if hasattr(param, "ds_id"):  # built under deepspeed.zero.Init
            import deepspeed

            deepspeed.zero.register_external_parameter(module, param)

    def _run(self, stages, tokens, document_ids=None):
        hidden = tokens if document_ids is None else (tokens, document_ids)
        for stage in stages:  # (hidden, document ids) go in as two arguments: see Block.forward
            hidden = stage(*hidden) if isinstance(hidden, tuple) else stage(hidden)
        return hidden

    def logits(self, tokens, document_ids=None):
        return self._run(self.children(), tokens, document_ids)

    def forward(self, tokens, labels=None, loss_mask=None, loss_tokens=None, document_ids=None):
        if labels is None:
            return self.logits(tokens, document_ids)
        if loss_mask is None:
            loss_mask = torch.ones_like(labels)
        *body, head = self.children()
        if head.loss_chunks > 1:  # the head computes the loss (chunked) inside its own forward
            return head(self._run(body, tokens, document_ids), labels, loss_mask, loss_tokens)
        return lm_loss(head(self._run(body, tokens, document_ids)), labels, loss_mask, loss_tokens)


def build_pipeline(cfg: ModelConfig, tp: int, pp: int, dp: int, options: ModelOptions = ModelOptions(),
                   seed: int = 1234):
    """The same stages as `GPT`, cut into `pp` DeepSpeed pipeline stages (blocks balanced across stages)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    tconfig, eod, chunks = transformer_config(cfg, tp, options), options.document_eod, options.loss_chunks
    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", Embedding, cfg, tconfig, eod, tied_weight_attr="word_embeddings.weight")
        last = TiedLayerSpec("embed", Embedding, cfg, tconfig, eod, tied_weight_attr="word_embeddings.weight",
                             forward_fn=_tied_logits if chunks == 1 else _hand_on_hidden)
    else:
        first = LayerSpec(Embedding, cfg, tconfig, eod)
        last = LayerSpec(OutputLayer, cfg, tconfig, None, chunks, True)
    specs = [first] + [LayerSpec(Block, cfg, tconfig, i + 1, options.recompute) for i in range(cfg.num_layers)]
    specs += [LayerSpec(FinalNorm, cfg, tconfig), last]
    # DeepSpeed's "data" axis is DP x CP: its rank order (model fastest, then data) is megatron's tp-cp-dp
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp * context_parallel.size())
    loss = PipelineLoss(chunks)
    pipe = PipelineModule(layers=specs, loss_fn=loss, topology=topology, partition_method="type:Block",
                          activation_checkpoint_interval=0, seed_layers=False, base_seed=seed)
    if pipe.stage_id == pp - 1:  # the module that owns the output weight on the last stage
        loss.head = pipe.tied_modules["embed"] if cfg.tie_embeddings else pipe.forward_funcs[-1]
    pipe.pipeline_loss = loss  # stays reachable when loss_fn is wrapped (pretrain/spike_guard.py; step.local_logits)
    return pipe


def _hand_on_hidden(embedding: Embedding, hidden):
    """The tied last stage under --loss-chunks: PipelineLoss projects the hidden states."""
    return hidden


def _tied_logits(embedding: Embedding, hidden):
    """Output projection with the (vocab-parallel) input embedding's weight: [s, b, h] -> [s, b, v/tp]."""
    if embedding.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward reduce-scatters, as the linear layer
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    else:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    return mask_vocab_padding(F.linear(hidden, embedding.word_embeddings.weight), embedding.vocab_size,
                              embedding.padded_vocab_size)


# ---------------------------------------------------------------------------------------------------------
# Initialisation that does not depend on the layout: every parameter's full (unsharded) value is drawn from a
# generator seeded by (seed, canonical name), and each rank keeps its TP slice. Same seed -> same model under
# any TP / PP / ZeRO layout, which is what makes the layout-equivalence tests (and reproducible runs) possible.
# ---------------------------------------------------------------------------------------------------------

def _full_init(name: str, shape, cfg: ModelConfig, seed: int, device) -> torch.Tensor:
    init = param_table.lookup(name).init  # the family's table says how (pretrain/param_table.py)
    if init == "one":
        return torch.ones(shape, device=device)
    if init == "zero":
        return torch.zeros(shape, device=device)
    std = cfg.init_std
    if init == "residual":
        std = std / (2.0 * cfg.num_layers) ** 0.5  # Megatron/GPT-2 scaled init of residual projections
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape, device=device).normal_(0.0, std, generator=gen)


def check_against_table(model: nn.Module, cfg: ModelConfig, whole: bool) -> None:
    """What megatron-core built is the family's table (pretrain/param_table.py): every built parameter has its
    row, and (`whole`: a model of every parameter, not one pipeline stage) every row was built, with its shape
    as this TP rank holds it. Raises naming the parameter; run once at construction."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    want = param_table.entries(cfg)
    built = {}
    for name, param in sharding.named_parameters(model):
        if name not in want:
            raise LayoutError(f"the model built parameter {name}, which the family table "
                              f"(pretrain/param_table.py) does not list for this config; add its row there")
        built[name] = tuple(getattr(param, "ds_shape", param.shape))
        expected = sharding.local_shape(name, want[name].shape(cfg), tp)
        if built[name] != expected:
            raise LayoutError(f"{name}: built with shape {built[name]} on a TP rank, the family table says "
                              f"{expected} (full {want[name].shape(cfg)}); fix its row in pretrain/param_table.py")
    held = {e for m in model.modules() for e in getattr(m, "local_expert_indices", ())}  # --ep: this rank's
    missing = [n for n, e in want.items() if n not in built and (e.expert is None or e.expert in held)]
    if whole and missing:
        raise LayoutError(f"the family table lists {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                          f"which the model did not build; fix pretrain/param_table.py's present= for this config")


@torch.no_grad()
def init_parameters(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    check_against_table(model, cfg, whole=not hasattr(model, "num_stages") or model.num_stages == 1)
    for name, param in sharding.named_parameters(model):
        # megatron marks TP-split weights only inside its own init, which we replace; DeepSpeed's gradient
        # norm and our own read this mark to count each shard once (not only TP rank 0's). Biases are marked at
        # construction already (megatron's helper asserts the mark is new), so they are checked instead.
        dim, _ = sharding.split_rule(name)
        if hasattr(param, "tensor_model_parallel"):
            assert bool(param.tensor_model_parallel) == (dim is not None), f"{name}: megatron splits it otherwise"
        else:
            tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=dim is not None,
                                                                 dim=-1 if dim is None else dim, stride=1)
        with _gathered(param):
            if param.numel() == 0:
                continue
            full_shape = sharding.full_shape(name, tuple(param.shape), tp)
            full = _full_init(name, full_shape, cfg, seed, param.device)
            param.copy_(sharding.shard(name, full, tp_rank, tp))


def _gathered(param):
    """Under ZeRO-3 a parameter is a partition: gather it, modify on DP rank 0, re-partition (broadcast)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()
