"""DeepSpeed checkpoints made safe for clusters: atomic `latest`, every rank's RNG state, keep-last-N.

DeepSpeed writes `latest` from rank 0 while other ranks may still be writing their ZeRO shards; a crash then
leaves `latest` naming a partial checkpoint. We save with save_latest=False, wait for every rank, mark the tag
complete, and only then replace `latest` (temp + rename).
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from common.files import write_json, write_text
from pretrain.parallel import Layout, LayoutError, barrier, is_rank0, log, rank, world_size

LATEST = "latest"
COMPLETE = "complete"
META = "meta.json"


def read_meta(load_dir: str) -> dict | None:
    """The latest checkpoint's layout, or None when there is no checkpoint."""
    tag = read_latest(load_dir)
    if tag is None:
        return None
    with open(os.path.join(load_dir, tag, META)) as f:
        return {**json.load(f), "tag": tag}


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core import tensor_parallel

    state["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def read_latest(save_dir: str) -> str | None:
    path = os.path.join(save_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.exists(os.path.join(save_dir, tag, COMPLETE)):
        raise RuntimeError(f"{save_dir}/{LATEST} names {tag}, which has no '{COMPLETE}' marker; the checkpoint is "
                           f"partial: point {LATEST} at an earlier tag or pass --load to another directory")
    return tag


def layout_meta(layout: Layout) -> dict:
    """What meta.json records of the layout, for resharding."""
    return {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "zero_stage": layout.zero_stage,
            "world_size": layout.world_size}


def save(engine, save_dir: str, iteration: int, client_state: dict, keep_last: int, layout: Layout,
         add_bias: bool = False) -> str:
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    from pretrain.sharding import universal_checkpoint_info

    tag = f"iter_{iteration:07d}"
    client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: universal_checkpoint_info(add_bias)}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), os.path.join(save_dir, tag, f"rng_rank{rank():05d}.pt"))
    barrier()  # every rank's shards and RNG are on disk
    if is_rank0():
        write_json(os.path.join(save_dir, tag, META), {**layout_meta(layout), "iteration": iteration,
                                                       "universal": False})
        write_text(os.path.join(save_dir, tag, COMPLETE), str(iteration))
        write_text(os.path.join(save_dir, LATEST), tag)
        _prune(save_dir, keep_last, keep=tag)
    barrier()
    return os.path.join(save_dir, tag)


def _prune(save_dir: str, keep_last: int, keep: str) -> None:
    tags = sorted(d for d in os.listdir(save_dir) if d.startswith("iter_") and
                  os.path.isdir(os.path.join(save_dir, d)))
    for tag in tags[:-keep_last] if keep_last > 0 else []:
        if tag != keep:
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


def load(engine, load_dir: str, load_optimizer: bool = True) -> dict | None:
    """Resume from `load_dir`'s latest complete checkpoint; returns its client state (None: nothing there)."""
    tag = read_latest(load_dir)
    if tag is None:
        return None
    meta = read_meta(load_dir)
    if meta.get("universal") and not engine.load_universal_checkpoint():
        raise RuntimeError(f"{load_dir}/{tag} is a universal checkpoint but DeepSpeed was not told to load one")
    _, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer,
                                             load_lr_scheduler_states=load_optimizer,
                                             load_module_only=not load_optimizer)
    if client_state is None:
        raise RuntimeError(f"{load_dir}/{tag}: DeepSpeed could not load it (see the log above)")
    rng_path = os.path.join(load_dir, tag, f"rng_rank{rank():05d}.pt")
    if os.path.exists(rng_path) and not meta.get("universal") and meta.get("world_size") == world_size():
        _set_rng_state(torch.load(rng_path, weights_only=True))
    return client_state


def resolve_resume(load_dir: str | None, layout: Layout, ds_config: dict) -> str | None:
    """Where to resume from, converting to a universal checkpoint when the data-parallel size changed.

    Same layout: load as saved. Another DP size: rank 0 converts the checkpoint once (the others wait), and
    DeepSpeed loads the universal form. Another TP/PP: the user converts explicitly (python -m pretrain.convert).
    """
    if not load_dir:
        return None
    meta = read_meta(load_dir)
    if meta is None:
        return None
    saved = (meta["tp"], meta["pp"], meta["dp"])
    if not meta.get("universal") and saved != (layout.tp, layout.pp, layout.dp):
        if (meta["tp"], meta["pp"]) != (layout.tp, layout.pp):
            raise LayoutError(
                f"{load_dir}/{meta['tag']} was saved with TP={meta['tp']} PP={meta['pp']}, this run has "
                f"TP={layout.tp} PP={layout.pp}: convert it first with `python -m pretrain.convert --load "
                f"{load_dir} --output <dir>` and pass --load <dir>")
        universal_dir = os.path.join(load_dir, "universal")
        if is_rank0():
            converted = read_meta(universal_dir) if os.path.exists(os.path.join(universal_dir, LATEST)) else None
            if not converted or converted["tag"] != meta["tag"]:
                from pretrain.convert import convert

                log(f"data-parallel size changed ({meta['dp']} -> {layout.dp}): converting {meta['tag']} to a "
                    f"universal checkpoint in {universal_dir}")
                convert(load_dir, universal_dir, meta["tag"])
        barrier()
        load_dir, meta = universal_dir, read_meta(universal_dir)
    if meta.get("universal"):
        if layout.zero_stage == 3 and layout.tp > 1:
            raise LayoutError("resuming a universal (converted) checkpoint into ZeRO-3 with TP > 1 is not supported "
                              "by DeepSpeed's ZeRO-3 loader (it cannot re-slice megatron TP shards); resume at "
                              "--tp 1, or with ZeRO-1/2")
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return load_dir
