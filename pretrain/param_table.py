"""Every parameter of a model family in one table: its full shape, how tensor parallelism splits it, how it
initialises, and its Hugging Face name(s) and fused layout.

Why (issue 35): the parameter layout used to live in five places matched by name strings (config.parameter_shapes,
sharding._SPLITS, model._full_init, hf.to_hf, hf.HFReader.local_rows) that agreed because tests checked them.
Now config, sharding, model initialisation, checkpoints, export and import all read the family's table, and the
model checks at construction that what megatron-core built is exactly the table (pretrain.model.init_parameters):
a layer kind added without its table entry fails there, naming the parameter, not later in a checkpoint or export.

Canonical names are the PP=1 model's: "<index>.<Param.name>", index 0 the embedding, 1..L the transformer layers,
L+1 the final norm, L+2 the output layer (checkpoints are keyed by them; pretrain/sharding.py maps DeepSpeed's and
the pipeline's names onto them).

Fused layouts (megatron-core's, which Hugging Face splits):
- "qkv": linear_qkv rows are, per query group, its query heads, then its key, then its value (HF: q/k/v_proj).
- "gate_up": linear_fc1 rows are [gate; up], each half split over TP on its own, because megatron's SwiGLU chunks
  each rank's local output into gate and up (HF: gate_proj, up_proj).
- "vocab": rows padded to the padded vocabulary (zeros past the tokenizer's on import, dropped on export).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

OWNERS = ("embedding", "layer", "final", "head")  # in model order


def _always(cfg) -> bool:
    return True


@dataclass(frozen=True)
class Param:
    owner: str  # one of OWNERS: which module (and so which canonical index) holds it
    name: str  # after the index: "layer.mlp.linear_fc1.weight"
    shape: Callable  # ModelConfig -> the full (unsharded) shape
    tp_dim: int | None = None  # the dimension split over TP ranks; None: whole on every rank
    gated: bool = False  # "gate_up": each half split on its own
    init: str = "normal"  # "one", "zero", "normal" (init_std), "residual" (init_std / sqrt(2 L): Megatron, GPT-2)
    hf: str | None = None  # Hugging Face name, "{i}" the 0-based layer, "{part}" the fused parts; None: not exported
    layout: str = "plain"  # "plain", "vocab", "qkv" or "gate_up" (module docstring)
    present: Callable = _always  # ModelConfig -> whether this model has it

    @property
    def per_expert(self) -> bool:
        """One tensor per expert: the name (and Hugging Face name) holds "{e}", the expert's global index."""
        return "{e}" in self.name

    def hf_names(self, layer: int | None, expert: int | None = None) -> list[str]:
        """The Hugging Face tensor(s) this parameter is (several for a fused layout), for 1-based `layer`."""
        parts = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}.get(self.layout, (None,))
        if self.per_expert:  # Mixtral names the expert halves w1 (gate) and w3 (up)
            parts = {"gate": "w1", "up": "w3", None: None}
            parts = [parts[p] for p in ({"gate_up": ("gate", "up")}.get(self.layout, (None,)))]
        i = None if layer is None else layer - 1
        return [self.hf.format(i=i, part=p, e=expert) for p in parts]


def _qkv_rows(c) -> int:
    return c.head_dim * (c.num_attention_heads + 2 * c.num_query_groups)


def _biased(c) -> bool:
    return c.add_bias


# The dense decoder (Llama, Mistral, Qwen2) and the EuroBERT-style encoder (the same layers with bidirectional
# attention, --objective mlm) share one table: they differ in the attention mask, not in their parameters. Order:
# the order parameter_shapes lists them (the planner walks it as DeepSpeed buckets them: pretrain/steptime.py).
DENSE = (
    Param("embedding", "word_embeddings.weight", lambda c: (c.padded_vocab_size, c.hidden_size), tp_dim=0,
          hf="model.embed_tokens.weight", layout="vocab"),
    Param("layer", "layer.input_layernorm.weight", lambda c: (c.hidden_size,), init="one",
          hf="model.layers.{i}.input_layernorm.weight"),
    Param("layer", "layer.self_attention.linear_qkv.weight", lambda c: (_qkv_rows(c), c.hidden_size), tp_dim=0,
          hf="model.layers.{i}.self_attn.{part}_proj.weight", layout="qkv"),
    Param("layer", "layer.self_attention.linear_proj.weight",
          lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim), tp_dim=1, init="residual",
          hf="model.layers.{i}.self_attn.o_proj.weight"),
    Param("layer", "layer.pre_mlp_layernorm.weight", lambda c: (c.hidden_size,), init="one",
          hf="model.layers.{i}.post_attention_layernorm.weight"),
    Param("layer", "layer.mlp.linear_fc1.weight", lambda c: (2 * c.ffn_hidden_size, c.hidden_size), tp_dim=0,
          gated=True, hf="model.layers.{i}.mlp.{part}_proj.weight", layout="gate_up"),
    Param("layer", "layer.mlp.linear_fc2.weight", lambda c: (c.hidden_size, c.ffn_hidden_size), tp_dim=1,
          init="residual", hf="model.layers.{i}.mlp.down_proj.weight"),
    # biases: on every linear (add_bias, no Hugging Face family here: export refuses it), or q/k/v only (Qwen2)
    Param("layer", "layer.self_attention.linear_qkv.bias", lambda c: (_qkv_rows(c),), tp_dim=0, init="zero",
          hf="model.layers.{i}.self_attn.{part}_proj.bias", layout="qkv",
          present=lambda c: c.add_bias or c.qkv_bias),
    Param("layer", "layer.self_attention.linear_proj.bias", lambda c: (c.hidden_size,), init="zero",
          present=_biased),
    Param("layer", "layer.mlp.linear_fc1.bias", lambda c: (2 * c.ffn_hidden_size,), tp_dim=0, gated=True,
          init="zero", layout="gate_up", present=_biased),
    Param("layer", "layer.mlp.linear_fc2.bias", lambda c: (c.hidden_size,), init="zero", present=_biased),
    Param("final", "norm.weight", lambda c: (c.hidden_size,), init="one", hf="model.norm.weight"),
    Param("head", "output_layer.weight", lambda c: (c.padded_vocab_size, c.hidden_size), tp_dim=0,
          hf="lm_head.weight", layout="vocab", present=lambda c: not c.tie_embeddings),
)


def _moe_ffn(c) -> int:
    return c.moe_ffn_hidden_size


# The mixture of experts (Mixtral-style: megatron-core's MoELayer in place of the dense MLP, pretrain/moe.py): the
# dense table's attention and norms, a router, and per expert a SwiGLU MLP. Expert rows carry "{e}", the expert's
# global index (0..num_experts-1): under expert parallelism (--ep) a rank builds num_experts / ep of them as
# megatron's local_experts 0.., and pretrain.sharding.named_parameters names them by their global index, so
# initialisation (seeded by name), checkpoints and export do not depend on EP. Experts split over TP as the dense
# MLP does (megatron's expert tensor parallelism = TP). Hugging Face names: Mixtral's per-expert w1 (gate), w3 (up),
# w2 (down); the router is its block_sparse_moe.gate.
_ATTENTION = tuple(p for p in DENSE if p.owner != "layer" or ".mlp." not in p.name)
_EXPERT = "layer.mlp.experts.local_experts.{e}."
MOE = _ATTENTION[:5] + (
    Param("layer", "layer.mlp.router.weight", lambda c: (c.num_experts, c.hidden_size),
          hf="model.layers.{i}.block_sparse_moe.gate.weight"),
    Param("layer", _EXPERT + "linear_fc1.weight", lambda c: (2 * _moe_ffn(c), c.hidden_size), tp_dim=0, gated=True,
          hf="model.layers.{i}.block_sparse_moe.experts.{e}.{part}.weight", layout="gate_up"),
    Param("layer", _EXPERT + "linear_fc2.weight", lambda c: (c.hidden_size, _moe_ffn(c)), tp_dim=1, init="residual",
          hf="model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"),
    # the optional shared expert (--moe-shared-expert-size): a dense SwiGLU MLP beside the routed ones, split over TP
    # as the dense MLP; Mixtral has none, so no Hugging Face name (export refuses it)
    Param("layer", "layer.mlp.shared_experts.linear_fc1.weight", lambda c: (2 * c.moe_shared_expert_size,
                                                                            c.hidden_size),
          tp_dim=0, gated=True, layout="gate_up", present=lambda c: c.moe_shared_expert_size > 0),
    Param("layer", "layer.mlp.shared_experts.linear_fc2.weight", lambda c: (c.hidden_size, c.moe_shared_expert_size),
          tp_dim=1, init="residual", present=lambda c: c.moe_shared_expert_size > 0),
) + _ATTENTION[5:]

TABLES = {"dense": DENSE, "moe": MOE}
_EXPERT_INDEX = re.compile(r"local_experts\.\d+\.")


def table(cfg) -> tuple[Param, ...]:
    """The family table of this model."""
    return TABLES["moe" if getattr(cfg, "num_experts", 0) else "dense"]


@dataclass(frozen=True)
class Entry:
    """One parameter of one model: its table row, its canonical name and (layer parameters) its 1-based layer."""
    param: Param
    name: str
    layer: int | None
    expert: int | None = None  # the global expert index of a per-expert row

    def shape(self, cfg) -> tuple[int, ...]:
        return tuple(self.param.shape(cfg))

    def hf_names(self) -> list[str]:
        return self.param.hf_names(self.layer, self.expert)


def entries(cfg) -> dict[str, Entry]:
    """Every parameter of this model by canonical name, in model order (embedding, each layer, norm, head)."""
    rows = [p for p in table(cfg) if p.present(cfg)]
    index = {"embedding": [0], "layer": range(1, cfg.num_layers + 1), "final": [cfg.num_layers + 1],
             "head": [cfg.num_layers + 2]}
    out = {}
    for owner in OWNERS:
        for i in index[owner]:
            mine = [p for p in rows if p.owner == owner]
            experts = [p for p in mine if p.per_expert]
            for p in mine:  # the expert rows as megatron builds them: expert 0's, then expert 1's, ...
                if p.per_expert and p is not experts[0]:
                    continue
                for e in range(cfg.num_experts) if p.per_expert else [None]:
                    for q in experts if p.per_expert else [p]:
                        name = f"{i}.{q.name}".replace("{e}", str(e))
                        out[name] = Entry(q, name, i if owner == "layer" else None, e)
    return out


def lookup(name: str) -> Param:
    """The table row of a canonical name (any family's: the split rules need no config), or a KeyError that
    names the fix."""
    name = _EXPERT_INDEX.sub("local_experts.{e}.", name)
    for rows in TABLES.values():
        for p in rows:
            if name == p.name or name.endswith("." + p.name):  # "3.layer.mlp..." and DeepSpeed-wrapped names
                return p
    raise KeyError(f"parameter {name!r} is in no family's table (pretrain/param_table.py); a new parameter needs "
                   f"its row there (shape, TP split, init, Hugging Face name) before the model can use it")
