"""Model shapes as dataclasses with named presets (litgpt style), and their closed-form sizes and FLOPs."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pretrain.objectives import objective


@dataclass
class ModelConfig:
    """A Llama-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None  # None: multi-head attention (one group per head)
    ffn_hidden_size: int | None = None  # None: Llama's 8/3 * hidden rounded up to a multiple of 256
    vocab_size: int = 32000  # the tokenizer's; the embedding is padded (see padded_vocab_size)
    seq_length: int = 2048
    rope_theta: float = 10000.0
    # Llama 3.1's frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, or None.
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    add_bias: bool = False  # biases on every linear layer (megatron's add_bias_linear)
    qkv_bias: bool = False  # biases on the query/key/value projection only (Qwen2)
    family: str = "llama"  # the Hugging Face family exports are written as (pretrain/hf.py)
    # the training objective's name (pretrain/objectives.py): "clm", a causal decoder trained on the next token;
    # "mlm", the same layers with bidirectional attention trained on masked tokens (an encoder, exported as EuroBERT)
    objective: str = "clm"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Pad the vocabulary to a multiple of this so that the shape (and so the model) does not depend on TP.
    make_vocab_size_divisible_by: int = 128
    # Mixture of experts (the "moe" family, pretrain/moe.py): 0 = the dense MLP. Otherwise each layer's MLP is
    # megatron-core's MoELayer: a router picks moe_top_k of num_experts SwiGLU experts per token (softmax over the
    # top k logits, Mixtral's routing), dropless (every token reaches its experts; no capacity factor).
    num_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_hidden_size: int | None = None  # each expert's width; None: ffn_hidden_size
    moe_aux_loss_coeff: float = 0.01  # Switch/GShard load-balancing loss per layer (megatron's "aux_loss")
    moe_z_loss_coeff: float = 0.0  # ST-MoE router z-loss; 0 = off
    moe_shared_expert_size: int = 0  # a shared expert (an MLP every token passes, DeepSeek/Qwen2-MoE) of this width

    def __post_init__(self):
        objective(self.objective)  # a ValueError naming the choices
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 256 * -(-int(8 * self.hidden_size / 3) // 256)
        if self.num_experts and self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        if self.num_experts and not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be between 1 and num_experts={self.num_experts}")
        if self.num_experts < 0 or self.num_experts == 1:
            raise ValueError(f"num_experts={self.num_experts}: 0 for the dense MLP, or at least 2 experts")
        if self.moe_shared_expert_size and not self.num_experts:
            raise ValueError("moe_shared_expert_size is a mixture of experts' shared expert: set num_experts too")
        if self.num_experts and self.add_bias:
            raise ValueError("add_bias with num_experts: the MoE family's experts have no biases (as Mixtral's "
                             "and Qwen3-MoE's); drop --add-bias or the experts")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; pick a head count that divides it"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by num_query_groups="
                f"{self.num_query_groups}; GQA needs whole groups of query heads"
            )

    @property
    def causal(self) -> bool:
        return objective(self.objective).causal

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return m * -(-self.vocab_size // m)

    def layer_params(self) -> int:
        """Parameters of one transformer layer (the family table's layer rows, pretrain/param_table.py)."""
        from pretrain.param_table import entries

        return sum(math.prod(e.shape(self)) for e in entries(self).values() if e.layer == 1)

    def num_params(self) -> int:
        """Exact parameter count of the model `pretrain.model` builds (padded vocabulary included): the family
        table's, which the built model is checked against."""
        return sum(math.prod(shape) for shape in self.parameter_shapes().values())

    def active_params(self) -> int:
        """Parameters one token computes with: all of a dense model; of a mixture of experts, moe_top_k experts'
        of each layer instead of all num_experts (MFU and FLOPs count these, as Megatron and Mixtral's paper do)."""
        return self.num_params() - self.num_layers * self.idle_layer_params()

    def idle_layer_params(self) -> int:
        """Parameters of one layer that a token does not compute with: a mixture of experts' unchosen experts (one
        expert's rows of the family table, num_experts - moe_top_k times)."""
        from pretrain.param_table import entries

        one_expert = sum(math.prod(e.shape(self)) for e in entries(self).values() if e.layer == 1 and e.expert == 0)
        return (self.num_experts - self.moe_top_k) * one_expert

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's full (unsharded) shape by canonical name, from the family's table
        (pretrain/param_table.py), which the built model is checked against: checkpoints, export and import take
        shapes from here, not from what a file happens to say."""
        from pretrain.param_table import entries

        return {name: e.shape(self) for name, e in entries(self).items()}

    def flops_per_token(self, seq_length: int | None = None) -> float:
        """Model FLOPs of one token's forward + backward (3x forward), attention scores included.

        Matmul parameters cost 2 FLOPs each per token forward; attention (QK^T and AV) costs 2 * 2 * s * h per
        layer forward. Bidirectional (mlm) attention computes all of it. Causal (clm) attention has half masked
        out, skipped by flash kernels, which we count as Megatron and PaLM do (full s), so figures compare with
        theirs. The mlm head projects every position, as EuroBERT's does, so both objectives have the same count.
        Recompute is not counted.
        """
        s = seq_length or self.seq_length
        matmul_params = self.active_params() - self.hidden_size * (2 * self.num_layers + 1)
        if not self.tie_embeddings:
            matmul_params -= self.padded_vocab_size * self.hidden_size  # the input lookup is no matmul
        attn = 2 * 2 * self.num_layers * s * self.num_attention_heads * self.head_dim
        return 3 * (2 * matmul_params + attn)

    def replace(self, **overrides) -> "ModelConfig":
        return dataclasses.replace(self, **overrides)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=128, vocab_size=512, seq_length=64),
    "125m": ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=2048),
    "350m": ModelConfig(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816),
    # TinyLlama-1.1B's shape.
    "1b": ModelConfig(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                      ffn_hidden_size=5632),
    # Llama-2 shapes.
    "7b": ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
                      seq_length=4096),
    "13b": ModelConfig(num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824,
                       seq_length=4096),
    "70b": ModelConfig(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                       ffn_hidden_size=28672, seq_length=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**{k: v for k, v in overrides.items() if v is not None})
