"""python -m pretrain.import_hf --hf HF_DIR --output CKPT_DIR [--tp N] [--pp N] [--seq-length N]

Writes a Hugging Face Llama / Mistral / Qwen2 model (pretrain/hf.py) once as a checkpoint of ours (iteration 0,
weights only: the optimizer starts fresh), cut for --tp, for many runs to start from with `--load CKPT_DIR`
(any layout reads it; --tp only decides the file cut). `--init-from-hf HF_DIR` on the trainer does the same
without the intermediate copy. Reads safetensors only (a pickled pytorch_model.bin is refused: it could run
code), one layer at a time, in one CPU process. The tokenizer stays in HF_DIR: prepare data with
`python -m data_prep prepare --tokenizer HF_DIR ...`, and export finds it through the checkpoint's meta.json.
"""
from __future__ import annotations

import argparse
import os
import sys

from common.files import check_output_dir
from pretrain import hf
from pretrain.convert import write_consolidated
from pretrain.parallel import LayoutError

MARKER = "dsllm_import.json"


def import_hf(hf_dir: str, output_dir: str, tp: int = 1, pp: int = 1, seq_length: int | None = None) -> str:
    check_output_dir(output_dir, MARKER, [hf_dir])
    cfg = hf.model_config(hf_dir, seq_length)
    reader = hf.HFReader(hf_dir, cfg)
    return write_consolidated(reader, output_dir, tp, pp, "iter_0000000", MARKER,
                              {"imported_from": {"hf": os.path.abspath(hf_dir), "family": cfg.family}})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.import_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--output", required=True, help="checkpoint directory to write (new, or an earlier import)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the files are cut for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check the model against")
    p.add_argument("--seq-length", type=int, help="training sequence length recorded in the checkpoint (default: "
                                                  "max_position_embeddings, at most 4096)")
    a = p.parse_args(argv)
    try:
        out = import_hf(a.hf, a.output, a.tp, a.pp, a.seq_length)
    except (FileNotFoundError, KeyError, ValueError, LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {a.hf} -> {out}; train from it with --load {a.output} (optimizer starts fresh)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
