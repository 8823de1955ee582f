"""python -m pretrain.convert --load CKPT_DIR --output OUT_DIR [--tp N] [--pp N] [--tag iter_NNNNNNN|best]

Rewrites a checkpoint of any layout as a consolidated one: every parameter's fp32 master and Adam moments whole
per tensor-parallel rank of the target --tp, one file per (TP rank, layer), so a run at that TP reads each
tensor in one piece. Any layout resumes from either form (the trainer converts on the fly when the layout
changed); converting once pays off when many runs start from one checkpoint, or to hand a checkpoint on without
its 64-rank file layout. --tp/--pp are checked against the model now rather than at the next launch.
Runs in one process on CPU, one layer at a time (memory: the largest layer's fp32 states, times three).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from common.files import atomic_dir, atomic_path, check_output_dir, file_xxh3, write_json, write_text
from pretrain import sharding
from pretrain.checkpoint import (COMPLETE, FORMAT, LATEST, META, VERSION, CheckpointError, CheckpointReader,
                                 resolve_tag)
from pretrain.parallel import LayoutError, validate_layout
from pretrain.zero_state import STATES

MARKER = "dsllm_convert.json"

def convert(load_dir: str, output_dir: str, tp: int = 1, pp: int = 1, tag: str | None = None) -> str:
    tag_dir = resolve_tag(load_dir, tag)
    check_output_dir(output_dir, MARKER, [load_dir, tag_dir])
    reader = CheckpointReader(tag_dir)
    source = {"checkpoint": os.path.abspath(tag_dir), "layout": reader.meta["layout"]}
    return write_consolidated(reader, output_dir, tp, pp, os.path.basename(tag_dir), MARKER,
                              {"converted_from": source})


def write_consolidated(reader, output_dir: str, tp: int, pp: int, out_tag: str, marker: str, extra: dict) -> str:
    """Every state `reader` has (a CheckpointReader, or pretrain.hf.HFReader: weights only), whole per TP rank of
    `tp`, as a checkpoint directory with one tag; written beside output_dir and renamed into place. -> tag dir."""
    from safetensors.torch import save_file

    # (a mixture of experts trains under TP only with sequence parallelism, which does not change the files)
    validate_layout(reader.cfg, tp * pp, tp, pp, zero_stage=1 if pp > 1 else 3,
                    sequence_parallel=tp > 1 and reader.cfg.is_moe)
    states = [s for s in STATES if reader.has_state(s)]
    by_stage = defaultdict(list)
    for name in reader.names():
        by_stage[int(name.split(".", 1)[0])].append(name)
    files = {}
    with atomic_dir(output_dir) as tmp:
        os.makedirs(os.path.join(tmp, out_tag))
        for stage, names in sorted(by_stage.items()):  # one layer's states in memory at a time
            per_rank = defaultdict(dict)
            for name in names:
                for state in states:
                    full = reader.full(name, state)
                    for r in range(tp):
                        part = sharding.shard(name, full, r, tp) if sharding.split_rule(name)[0] is not None else full
                        per_rank[r][f"{state}/{r}/0/{name}"] = part.reshape(-1).contiguous().clone()
            for r, tensors in per_rank.items():
                fname = f"tp{r:02d}-stage{stage:05d}.safetensors"
                path = os.path.join(tmp, out_tag, fname)
                with atomic_path(path) as t:
                    save_file(tensors, t)
                files[fname] = {"bytes": os.path.getsize(path), "xxh3_128": file_xxh3(path)}
        meta = {**reader.meta, "format": FORMAT, "version": VERSION, "files": files,
                "layout": {"tp": tp, "pp": pp, "dp": None, "zero_stage": None, "world_size": None}, **extra}
        write_json(os.path.join(tmp, out_tag, META), meta)
        write_text(os.path.join(tmp, out_tag, COMPLETE), str(meta["iteration"]))
        write_text(os.path.join(tmp, LATEST), out_tag)
        write_json(os.path.join(tmp, marker), extra)
    return os.path.join(output_dir, out_tag)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (or one tag directory)")
    p.add_argument("--output", required=True, help="where the consolidated checkpoint goes (a new directory)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the files are cut for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check the model against")
    p.add_argument("--tag", help="which checkpoint: iter_NNNNNNN, or best (the one --keep-best named); default: "
                                 "the one 'latest' names")
    a = p.parse_args(argv)
    try:
        out = convert(a.load, a.output, a.tp, a.pp, a.tag)
    except (FileNotFoundError, ValueError, CheckpointError, LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"consolidated checkpoint (TP={a.tp}) -> {out}; resume with --load {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
