"""Hugging Face checkpoints in and out: config.json <-> ModelConfig, HF parameter names <-> ours, and a reader that
serves any layout's rank-local slices straight from HF safetensors.

Families: Llama (1/2/3, with Llama 3.1's rope scaling), Mistral (without a sliding window in use) and Qwen2 (bias on
the query/key/value projections only: megatron's add_qkv_bias), with grouped-query attention, tied or untied
embeddings, any rope_theta and rms_norm_eps; and EuroBERT, the encoder: Llama's layers with bidirectional attention
and Llama's parameter names (EuroBertForMaskedLM's head is the final norm + lm_head, as ours), which is what an
--objective mlm model is written as and read from. A config that asks for something the model here does not compute
(a sliding window in use, mixture of experts, another rope scaling, biases elsewhere, another activation) is refused
naming the field: never approximated.

Names and fused layouts come from the family's table (pretrain/param_table.py): linear_qkv rows are, per query
group, its query heads, then its key, then its value; linear_fc1 rows are [gate; up]. The vocabulary is padded to
a multiple of 128 (rows past the HF vocabulary are zero on import and dropped on export). Nothing is unpickled:
safetensors only.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import torch

from pretrain import param_table, sharding
from pretrain.config import ModelConfig
from pretrain.objectives import for_hf_family, objective

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "eurobert": "EuroBertForMaskedLM", "mixtral": "MixtralForCausalLM"}
MOE_FAMILIES = ("mixtral",)


class HFConfigError(ValueError):
    """A Hugging Face config this model cannot reproduce; names the field."""


# ------------------------------------------------------------------------------------------------ config
def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, Llama-3 scaling parameters or None) from either spelling: transformers 5's rope_parameters,
    or the older rope_theta + rope_scaling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise HFConfigError(f"config.json: rope scaling {kind!r} (rope_scaling / rope_parameters.rope_type) is not "
                            f"implemented here; only Llama 3.1's 'llama3' is")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: scaling[k] for k in keys}


def model_config(hf_dir: str, seq_length: int | None = None) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--init-from-hf {hf_dir}: no config.json (a directory written by "
                                f"save_pretrained or downloaded from the Hub)")
    with open(path) as f:
        hf = json.load(f)
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise HFConfigError(f"{path}: model_type {family!r} is not one of {', '.join(ARCHITECTURES)}")
    _refuse_unsupported(hf, family, path)
    theta, scaling = _rope(hf)
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, h // heads):
        raise HFConfigError(f"{path}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads "
                            f"({h // heads}), which the model here assumes")
    k = hf.get("num_experts_per_tok", 2)
    experts = {} if family not in MOE_FAMILIES else dict(
        num_experts=hf["num_local_experts"], moe_top_k=k, moe_ffn_hidden_size=hf["intermediate_size"],
        moe_aux_loss_coeff=aux_coeff_from_hf(hf.get("router_aux_loss_coef", 0.001), k, hf["num_hidden_layers"]))
    return ModelConfig(num_layers=hf["num_hidden_layers"], hidden_size=h, num_attention_heads=heads,
                       num_query_groups=hf.get("num_key_value_heads", heads), **experts,
                       ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                       seq_length=seq_length or min(hf.get("max_position_embeddings", 2048), 4096),
                       rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
                       init_std=hf.get("initializer_range", 0.02),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=family == "qwen2",
                       family=family, objective=for_hf_family(family).name)


def aux_coeff_from_hf(coef: float, top_k: int, num_layers: int) -> float:
    """Mixtral's router_aux_loss_coef -> our per-layer moe_aux_loss_coeff. transformers (5.25,
    load_balancing_loss_func) adds one load-balancing loss pooled over every layer's tokens, k at perfect balance;
    megatron's adds one per layer, each 1 at balance (switch_load_balancing_loss_func divides by k). The same
    weight at balance: coef x k / layers. (transformers adds it only with output_router_logits, off by default.)"""
    return coef * top_k / num_layers


def aux_coeff_to_hf(coeff: float, top_k: int, num_layers: int) -> float:
    return float(f"{coeff * num_layers / top_k:.12g}")  # the inverse, without float noise in config.json


def _refuse_unsupported(hf: dict, family: str, path: str) -> None:
    def refuse(field, why):
        raise HFConfigError(f"{path}: {field} = {hf.get(field)!r}: {why}; the model here would not compute the "
                            f"same function, so it is refused rather than approximated")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only SiLU (SwiGLU) is implemented")
    for field in ("num_local_experts", "num_experts", "n_routed_experts"):
        if hf.get(field) and family not in MOE_FAMILIES:
            refuse(field, f"a mixture of experts is implemented for {', '.join(MOE_FAMILIES)} (Mixtral's router and "
                          f"SwiGLU experts), not for {family}")
    if family in MOE_FAMILIES and hf.get("router_jitter_noise"):
        refuse("router_jitter_noise", "router input jitter is not implemented")
    if family in MOE_FAMILIES and hf.get("num_experts_per_tok") == 1:
        refuse("num_experts_per_tok", "Mixtral renormalises the chosen experts' weights, so top-1 weighs every "
                                      "token 1.0; top-1 here is Switch Transformer's (the softmax probability)")
    window = hf.get("sliding_window")
    if window is not None and (family == "mistral" or hf.get("use_sliding_window")) and \
            window < hf.get("max_position_embeddings", window + 1):
        refuse("sliding_window", "sliding-window attention is not implemented")
    if family != "qwen2" and hf.get("attention_bias"):
        refuse("attention_bias", "biases on the attention projections are implemented for Qwen2's q/k/v only")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", "biases in the MLP are not implemented")


def export_family(cfg: ModelConfig) -> str:
    """The family an export is written as: the objective's own (EuroBERT for an mlm encoder); for a decoder the
    family it was imported from (a decoder imported from EuroBERT weights: Llama, which has the same names); Llama
    for our own."""
    family = objective(cfg.objective).hf_family
    if family == "eurobert":
        if cfg.qkv_bias:
            raise ValueError("export: an mlm model with q/k/v biases (imported from Qwen2) matches no encoder family "
                             "here (EuroBERT's attention_bias would add an output-projection bias too)")
        return family
    if cfg.is_moe:
        if cfg.moe_top_k == 1:
            raise ValueError("export: a top-1 mixture of experts (Switch Transformer's routing: the softmax "
                             "probability weighs the expert) is not Mixtral's (which renormalises it to 1.0); no "
                             "Hugging Face family here computes it")
        if cfg.moe_shared_expert_size:
            raise ValueError("export: a mixture of experts with a shared expert (--moe-shared-expert-size) is not "
                             "Mixtral's, the one mixture-of-experts family written here")
        return "mixtral"  # the one mixture-of-experts family here (pretrain/param_table.py's MoE table)
    return "llama" if cfg.family in (None, "eurobert", "mixtral") else cfg.family


def hf_config(cfg: ModelConfig, dtype: str, token_ids: dict | None = None) -> dict:
    """config.json of the export (`export_family`). token_ids: {bos,eos,pad,mask}_token_id from the tokenizer
    (EuroBERT needs mask_token_id: its default, 128002, is EuroBERT's own vocabulary's)."""
    family = export_family(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta} if not cfg.rope_scaling else \
        {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **cfg.rope_scaling}
    out = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
           "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.head_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.seq_length, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "rope_parameters": rope, "rope_scaling": None if not cfg.rope_scaling else rope,
           "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype, "initializer_range": cfg.init_std}
    if family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    if family in ("mistral", "mixtral"):
        out["sliding_window"] = None
    if family == "mixtral":
        out.update(intermediate_size=cfg.moe_ffn_hidden_size, num_local_experts=cfg.num_experts,
                   num_experts_per_tok=cfg.moe_top_k,
                   router_aux_loss_coef=aux_coeff_to_hf(cfg.moe_aux_loss_coeff, cfg.moe_top_k, cfg.num_layers),
                   router_jitter_noise=0.0, output_router_logits=False)
    if family == "eurobert":
        if (token_ids or {}).get("mask_token_id") is None:
            raise ValueError("export: an mlm model's config needs its tokenizer's mask token id; pass --tokenizer "
                             "(the tokenizer the run trained with, which has a mask token)")
        out.update(use_cache=False)
    out.update({k: v for k, v in (token_ids or {}).items() if v is not None})
    return out


# ------------------------------------------------------------------------------------------------ weights out
def to_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full (TP-merged) tensors by canonical name -> HF names, each as its family table row says
    (pretrain/param_table.py); the vocabulary padding is dropped."""
    out = {}
    for name, e in param_table.entries(cfg).items():
        if e.param.hf is None:
            raise ValueError(f"export: {name} has no Hugging Face name in pretrain/param_table.py (no family "
                             f"here writes it)")
        out.update(zip(e.hf_names(), _unfuse(e.param.layout, tensors[name], cfg)))
    return {k: t.contiguous() for k, t in out.items()}


def _unfuse(layout: str, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """One of our tensors -> its Hugging Face tensor(s), in Param.hf_names order."""
    if layout == "vocab":
        return [t[:cfg.vocab_size]]
    if layout == "gate_up":
        return list(t.chunk(2, dim=0))
    if layout == "qkv":  # per query group: its query heads, its key, its value
        d, ng = cfg.head_dim, cfg.num_query_groups
        per_group = cfg.num_attention_heads // ng
        qkv = t.view(ng, (per_group + 2) * d, *t.shape[1:])
        return [qkv[:, :per_group * d].reshape(per_group * ng * d, *t.shape[1:]),
                qkv[:, per_group * d:(per_group + 1) * d].reshape(ng * d, *t.shape[1:]),
                qkv[:, (per_group + 1) * d:].reshape(ng * d, *t.shape[1:])]
    return [t]


# ------------------------------------------------------------------------------------------------ weights in
class HFReader:
    """Serves our parameters, by canonical name and as any layout's rank-local range, from an HF directory's
    safetensors (one file or sharded with an index), reading only the rows a rank needs."""

    def __init__(self, hf_dir: str, cfg: ModelConfig):
        from safetensors import safe_open

        self.dir, self.cfg = hf_dir, cfg
        self.entries = param_table.entries(cfg)
        self.shapes = {name: e.shape(cfg) for name, e in self.entries.items()}
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            with open(os.path.join(hf_dir, "model.safetensors"), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
        else:
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json (only "
                                    f"safetensors are read: a pickled pytorch_model.bin could run code)")
        self._files = {name: safe_open(os.path.join(hf_dir, name), framework="pt") for name in set(weight_map.values())}
        self._where = weight_map
        self.meta = {"iteration": 0, "consumed_samples": 0, "adam_step": 0, "model_config": cfg.__dict__,
                     "layout": {"tp": 1, "pp": 1, "dp": None, "zero_stage": None, "world_size": None},
                     "run_config": {"init_from_hf": os.path.abspath(hf_dir)}}
        if os.path.exists(os.path.join(hf_dir, "tokenizer.json")):  # export takes the tokenizer from here
            self.meta["run_config"]["tokenizer_path"] = os.path.abspath(os.path.join(hf_dir, "tokenizer.json"))

    def names(self) -> list[str]:
        return list(self.shapes)

    def has_state(self, state: str) -> bool:
        return state == "fp32"

    def _rows(self, hf_name: str, r0: int, r1: int, c0: int | None = None, c1: int | None = None) -> torch.Tensor:
        if hf_name not in self._where:
            fused = self._fused_expert(hf_name)
            if fused is None:
                raise KeyError(f"{self.dir}: no tensor {hf_name} (the config says it should exist)")
            hf_name, index, r0, r1 = fused[0], fused[1], r0 + fused[2], r1 + fused[2]
            if index is not None:  # one expert of a [experts, rows, columns] tensor
                s = self._files[self._where[hf_name]].get_slice(hf_name)
                t = s[index:index + 1, r0:r1] if c0 is None else s[index:index + 1, r0:r1, c0:c1]
                return t[0].float()
        s = self._files[self._where[hf_name]].get_slice(hf_name)
        t = s[r0:r1] if c0 is None else s[r0:r1, c0:c1]
        return t.float()

    _LEGACY_EXPERT = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\."
                                r"(?:gate\.weight|experts\.(\d+)\.(w[123])\.weight)$")

    def _fused_expert(self, hf_name: str):
        """A Mixtral tensor in the per-expert naming (what save_pretrained writes and the Hub holds) read from the
        fused naming of transformers 5's modules (mlp.gate.weight; mlp.experts.gate_up_proj [E, 2f, h], gate rows
        first; mlp.experts.down_proj [E, h, f]): -> (fused name, index into its first dimension or None, row
        offset), or None when neither naming has it."""
        m = self._LEGACY_EXPERT.match(hf_name)
        if m is None:
            return None
        prefix, expert, part = m.groups()
        if expert is None:  # the router: a plain 2-D tensor under its new name, read as one expert-less "slice"
            name = prefix + "mlp.gate.weight"
            return None if name not in self._where else (name, None, 0)
        name = prefix + ("mlp.experts.down_proj" if part == "w2" else "mlp.experts.gate_up_proj")
        offset = self.cfg.moe_ffn_hidden_size if part == "w3" else 0
        return None if name not in self._where else (name, int(expert), offset)

    def local_rows(self, name: str, tp: int, rank: int, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of TP rank `rank`'s slice of our parameter `name` under `tp` ranks (fp32), read as its
        family table row says (pretrain/param_table.py)."""
        cfg, e = self.cfg, self.entries.get(name)
        if e is None or e.param.hf is None:
            raise KeyError(f"no Hugging Face tensor maps to {name}")
        p, hf, full = e.param, e.hf_names(), self.shapes[name]
        if p.layout == "vocab":  # the padded vocabulary: zero rows past the tokenizer's
            base = rank * cfg.padded_vocab_size // tp
            a, b = base + r0, base + r1
            rows = self._rows(hf[0], min(a, cfg.vocab_size), min(b, cfg.vocab_size))
            pad = torch.zeros(b - a - len(rows), cfg.hidden_size)
            return torch.cat([rows, pad]) if len(pad) else rows
        if p.layout == "qkv":
            return self._qkv_rows(hf, tp, rank, r0, r1)
        if p.layout == "gate_up":  # [gate; up], each split across TP ranks on its own
            f = full[0] // 2 // tp
            pieces = []
            for src, lo, hi in ((hf[0], 0, f), (hf[1], f, 2 * f)):
                a, b = max(r0, lo), min(r1, hi)
                if a < b:
                    pieces.append(self._rows(src, rank * f + a - lo, rank * f + b - lo))
            return torch.cat(pieces)
        if p.tp_dim == 1:  # row-parallel: this rank's columns
            cols = full[1] // tp
            return self._rows(hf[0], r0, r1, rank * cols, (rank + 1) * cols)
        if p.tp_dim == 0:
            rows = full[0] // tp
            return self._rows(hf[0], rank * rows + r0, rank * rows + r1)
        return self._rows(hf[0], r0, r1)

    def _qkv_rows(self, hf: list[str], tp: int, rank: int, r0: int, r1: int) -> torch.Tensor:
        """Our fused QKV rows of a rank: per query group, its query heads, its key, its value (`hf`: the q, k
        and v tensors' names)."""
        cfg = self.cfg
        d, per_group = cfg.head_dim, cfg.num_attention_heads // cfg.num_query_groups
        block = (per_group + 2) * d
        first_group = rank * cfg.num_query_groups // tp
        pieces = []
        for g in range(r0 // block, -(-r1 // block)):
            group = first_group + g
            lo, hi = max(r0 - g * block, 0), min(r1 - g * block, block)
            for src, start, width, row0 in ((hf[0], 0, per_group * d, group * per_group * d),
                                            (hf[1], per_group * d, d, group * d),
                                            (hf[2], (per_group + 1) * d, d, group * d)):
                a, b = max(lo, start), min(hi, start + width)
                if a < b:
                    pieces.append(self._rows(src, row0 + a - start, row0 + b - start))
        return torch.cat(pieces)

    def local_range(self, name: str, state: str, tp: int, tp_rank: int, start: int, numel: int) -> torch.Tensor:
        if state != "fp32":
            raise KeyError(f"{self.dir} holds weights only, no {state}")
        shape = sharding.local_shape(name, self.shapes[name], tp)
        row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        r0, r1 = start // row, -(-(start + numel) // row)
        rows = self.local_rows(name, tp, tp_rank, r0, r1).reshape(-1)
        return rows[start - r0 * row:start - r0 * row + numel].clone()

    def full(self, name: str, state: str = "fp32") -> torch.Tensor:
        shape = self.shapes[name]
        return self.local_rows(name, 1, 0, 0, shape[0]).reshape(shape)
