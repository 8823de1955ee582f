"""python -m pretrain.export --load CKPT_DIR --output HF_DIR [--dtype bf16|fp32]

Writes a Hugging Face Llama checkpoint (config.json, model.safetensors, tokenizer files) from a checkpoint of
any TP / PP / ZeRO layout. ZeRO >= 1 checkpoints go through DeepSpeed's universal conversion (fp32 master
weights, TP shards merged by our sharding table); ZeRO-0 checkpoints are merged from their module states.
Nothing is unpickled from the exported files: weights are safetensors, loaded by transformers as such.
The vocabulary stays padded (as trained), so logits match ours exactly; config.vocab_size says so.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile

import torch

from pretrain import sharding
from pretrain.checkpoint import read_meta
from pretrain.config import ModelConfig


def _client_state(tag_dir: str) -> dict:
    """The engine-level model-states file (it carries our client state); per-layer PP files do not."""
    states = sorted(glob.glob(os.path.join(tag_dir, "*mp_rank_00_model_states.pt")))
    if not states:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
    return torch.load(states[0], map_location="cpu", weights_only=False)  # written by our own trainer


def _universal_tensors(tag_dir: str) -> dict[str, torch.Tensor]:
    out = {}
    for path in glob.glob(os.path.join(tag_dir, "zero", "*", "fp32.pt")):
        name = os.path.basename(os.path.dirname(path))
        # DeepSpeed's own file, written by ds_to_universal from our checkpoint.
        out[sharding.canonical_name(name)] = torch.load(path, map_location="cpu", weights_only=False)["param"]
    return out


def _module_state_tensors(tag_dir: str, tp: int) -> dict[str, torch.Tensor]:
    """ZeRO-0 (and ZeRO-1/2 without PP): mp_rank_XX_model_states.pt hold each TP rank's full module."""
    per_rank = []
    for r in range(tp):
        path = os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt")
        per_rank.append(torch.load(path, map_location="cpu", weights_only=False)["module"])  # our checkpoint
    return {sharding.canonical_name(k): sharding.merge(sharding.canonical_name(k), [sd[k] for sd in per_rank])
            for k in per_rank[0]}


def full_state_dict(load_dir: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (canonical name -> full fp32 tensor, model config dict, meta) from the latest checkpoint."""
    meta = read_meta(load_dir)
    if meta is None:
        raise FileNotFoundError(f"{load_dir}: no checkpoint ('latest' is missing)")
    tag_dir = os.path.join(load_dir, meta["tag"])
    client = _client_state(tag_dir)
    cfg = client["run_config"]["model_config"] if "run_config" in client else None
    if meta.get("universal"):
        tensors = _universal_tensors(tag_dir)
    elif meta["zero_stage"] == 0 and meta["pp"] == 1:
        tensors = _module_state_tensors(tag_dir, meta["tp"])
    else:
        from pretrain.convert import convert

        tmp = tempfile.mkdtemp(prefix="export-universal-")
        try:
            tensors = _universal_tensors(convert(load_dir, tmp, meta["tag"]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if cfg is None:
        raise ValueError(f"{tag_dir}: the checkpoint carries no run config (not written by pretrain/main.py)")
    return tensors, cfg, meta


def to_hf_llama(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    L, h, d = cfg.num_layers, cfg.hidden_size, cfg.head_dim
    nh, ng = cfg.num_attention_heads, cfg.num_query_groups
    per_group = nh // ng
    out = {"model.embed_tokens.weight": tensors["0.word_embeddings.weight"],
           "model.norm.weight": tensors[f"{L + 1}.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = tensors[f"{L + 2}.output_layer.weight"]
    for i in range(1, L + 1):
        p, q = f"{i}.layer.", f"model.layers.{i - 1}."
        # megatron's fused QKV rows: for each query group, its per_group query heads, then its key, its value.
        qkv = tensors[p + "self_attention.linear_qkv.weight"].view(ng, (per_group + 2) * d, h)
        out[q + "self_attn.q_proj.weight"] = qkv[:, : per_group * d].reshape(nh * d, h)
        out[q + "self_attn.k_proj.weight"] = qkv[:, per_group * d: (per_group + 1) * d].reshape(ng * d, h)
        out[q + "self_attn.v_proj.weight"] = qkv[:, (per_group + 1) * d:].reshape(ng * d, h)
        out[q + "self_attn.o_proj.weight"] = tensors[p + "self_attention.linear_proj.weight"]
        gate, up = tensors[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = gate, up
        out[q + "mlp.down_proj.weight"] = tensors[p + "mlp.linear_fc2.weight"]
        out[q + "input_layernorm.weight"] = tensors[p + "input_layernorm.weight"]
        out[q + "post_attention_layernorm.weight"] = tensors[p + "pre_mlp_layernorm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_length, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype, "initializer_range": cfg.init_std,
    }


def export(load_dir: str, output_dir: str, dtype: str = "bfloat16", tokenizer: str | None = None) -> str:
    from safetensors.torch import save_file

    tensors, cfg_dict, meta = full_state_dict(load_dir)
    cfg = ModelConfig(**cfg_dict)
    if cfg.add_bias:
        raise ValueError("export: models with biases are not Llama-shaped; train with add_bias=False")
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    weights = {k: v.to(torch_dtype) for k, v in to_hf_llama(tensors, cfg).items()}
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config(cfg, dtype), f, indent=2)
    tok_dir = _tokenizer_dir(load_dir, meta, tokenizer)
    if tok_dir:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.exists(os.path.join(tok_dir, name)):
                shutil.copy(os.path.join(tok_dir, name), tmp)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": 0.8, "top_k": 40}, f)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(tmp, output_dir)
    return output_dir


def _tokenizer_dir(load_dir: str, meta: dict, override: str | None) -> str | None:
    if override:
        return override if os.path.isdir(override) else os.path.dirname(override)
    run = _client_state(os.path.join(load_dir, meta["tag"])).get("run_config", {})
    path = run.get("tokenizer_path")
    return os.path.dirname(path) if path else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory written by pretrain/main.py")
    p.add_argument("--output", required=True, help="Hugging Face model directory to write")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one the run trained with)")
    a = p.parse_args(argv)
    try:
        out = export(a.load, a.output, a.dtype, a.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Hugging Face Llama checkpoint -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
