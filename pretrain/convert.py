"""python -m pretrain.convert --load CKPT_DIR --output OUT_DIR [--tag TAG]

Turns a checkpoint of any layout (TP/PP/DP/ZeRO) into a DeepSpeed universal checkpoint: fp32 weights and Adam
moments per parameter, TP shards merged by our sharding table (which every checkpoint carries). A run started
with `--load OUT_DIR` under another data-parallel size, or at TP=1, resumes from it exactly, optimizer included.
Runs in one process on CPU; no GPU or distributed launch needed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from types import SimpleNamespace

from common.files import write_json, write_text
from pretrain.checkpoint import COMPLETE, LATEST, META, read_meta


def convert(load_dir: str, output_dir: str, tag: str | None = None, workers: int = 1) -> str:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    meta = read_meta(load_dir)
    if meta is None:
        raise FileNotFoundError(f"{load_dir}: no checkpoint ('{LATEST}' is missing)")
    tag = tag or meta["tag"]
    out = os.path.join(output_dir, tag)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(output_dir, exist_ok=True)
    ds_to_universal(SimpleNamespace(input_folder=os.path.join(load_dir, tag), output_folder=tmp,
                                    num_extract_workers=workers, num_merge_workers=workers,
                                    keep_temp_folder=False, strict=True, inject_missing_state=True))
    write_json(os.path.join(tmp, META), {**{k: v for k, v in meta.items() if k != "tag"}, "universal": True,
                                         "converted_from": os.path.abspath(os.path.join(load_dir, tag))})
    write_text(os.path.join(tmp, COMPLETE), str(meta["iteration"]))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    for name in (LATEST, "latest_universal"):  # DeepSpeed reads latest_universal in universal mode
        write_text(os.path.join(output_dir, name), tag)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (with 'latest')")
    p.add_argument("--output", required=True, help="where the universal checkpoint goes")
    p.add_argument("--tag", help="default: the one 'latest' names")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    try:
        out = convert(a.load, a.output, a.tag, a.workers)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"universal checkpoint -> {out}; resume with --load {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
