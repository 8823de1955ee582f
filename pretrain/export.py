"""python -m pretrain.export --load CKPT_DIR --output HF_DIR [--dtype bfloat16|float32] [--tag iter_NNNNNNN|best]

Writes a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files; Llama, or the family a model
imported with --init-from-hf came from, or EuroBERT for an --objective mlm encoder: pretrain/hf.py) from a
checkpoint of any TP / PP / DP / ZeRO layout: the fp32 master weights, read by canonical name and merged across
tensor-parallel ranks with the sharding table (pretrain/checkpoint.py:CheckpointReader). The checkpoint is verified
first. Nothing is unpickled, on either side: weights are safetensors.

The output directory is written beside its final name and renamed into place when complete. An existing
directory is replaced only if it is an earlier export (it holds dsllm_export.json); anything else, the
checkpoint itself, or a directory containing it, is refused. The vocabulary padding (rows past the tokenizer's
vocabulary, never a target) is dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

from common.files import atomic_dir, check_output_dir
from pretrain import hf
from pretrain.checkpoint import CheckpointError, CheckpointReader, resolve_tag
from pretrain.objectives import objective

MARKER = "dsllm_export.json"


def export(load_dir: str, output_dir: str, dtype: str = "bfloat16", tokenizer: str | None = None,
           tag: str | None = None) -> str:
    from safetensors.torch import save_file

    tag_dir = resolve_tag(load_dir, tag)
    check_output_dir(output_dir, MARKER, [load_dir, tag_dir])
    reader = CheckpointReader(tag_dir)
    cfg = reader.cfg
    if cfg.add_bias:
        raise ValueError("export: biases on every linear layer match no Hugging Face family here; train with "
                         "add_bias=False (Qwen2-style q/k/v biases export as Qwen2)")
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    tensors = {name: reader.full(name) for name in reader.names()}
    weights = {k: v.to(torch_dtype) for k, v in hf.to_hf(tensors, cfg).items()}
    tok_dir = _tokenizer_dir(reader.meta, tokenizer)
    config = hf.hf_config(cfg, dtype, _token_ids(tok_dir) if hf.export_family(cfg) == "eurobert" else None)
    with atomic_dir(output_dir) as tmp:
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "config.json"), config)
        if objective(cfg.objective).generates:  # an encoder generates nothing
            _write_json(os.path.join(tmp, "generation_config.json"),
                        {"do_sample": True, "temperature": 0.8, "top_k": 40})
        if tok_dir:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if os.path.exists(os.path.join(tok_dir, name)):
                    shutil.copy(os.path.join(tok_dir, name), tmp)
        _write_chat_template(tmp, reader.meta.get("run_config", {}).get("chat_template"))
        _write_json(os.path.join(tmp, MARKER), {"checkpoint": os.path.abspath(tag_dir),
                                                "iteration": reader.meta["iteration"], "dtype": dtype})
    return output_dir


def _write_chat_template(out_dir: str, template: dict | None) -> None:
    """A fine-tuned model (--objective sft) carries the chat template its data was rendered with (the data
    manifest's, recorded in the run's config): in tokenizer_config.json, where transformers' apply_chat_template
    reads it, and its end-of-turn token as generation_config's eos, so `generate` stops at the end of an answer."""
    if not template:
        return
    path = os.path.join(out_dir, "tokenizer_config.json")
    config = json.load(open(path)) if os.path.exists(path) else {"tokenizer_class": "PreTrainedTokenizerFast"}
    _write_json(path, {**config, "chat_template": template["source"]})
    from tokenizers import Tokenizer

    eot = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json")).token_to_id(template["end_of_turn"])
    gen_path = os.path.join(out_dir, "generation_config.json")
    if eot is not None and os.path.exists(gen_path):
        gen = json.load(open(gen_path))
        config_eos = json.load(open(os.path.join(out_dir, "config.json"))).get("eos_token_id")
        _write_json(gen_path, {**gen, "eos_token_id": [eot] + ([config_eos] if config_eos is not None else [])})


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _token_ids(tok_dir: str | None) -> dict:
    """The special token ids config.json states (EuroBERT's mask_token_id above all), from the run's tokenizer."""
    from data_prep import tokenizer as tokenizers

    if not tok_dir or not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        return {}
    return tokenizers.special_token_ids(tokenizers.load(tok_dir), os.path.join(tok_dir, "tokenizer.json"))


def _tokenizer_dir(meta: dict, override: str | None) -> str | None:
    if override:
        return override if os.path.isdir(override) else os.path.dirname(override)
    path = meta.get("run_config", {}).get("tokenizer_path")
    return os.path.dirname(path) if path else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory written by pretrain/main.py (or one tag)")
    p.add_argument("--output", required=True, help="Hugging Face model directory to write")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one the run trained with)")
    p.add_argument("--tag", help="which checkpoint: iter_NNNNNNN, or best (the one --keep-best named); default: "
                                 "the one 'latest' names")
    a = p.parse_args(argv)
    try:
        out = export(a.load, a.output, a.dtype, a.tokenizer, a.tag)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Hugging Face checkpoint -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
