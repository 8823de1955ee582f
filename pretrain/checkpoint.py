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
import torch.distributed as dist

from data_prep.atomic import write_json, write_text

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


def _barrier():
    if dist.is_initialized():
        dist.barrier()


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


def save(engine, save_dir: str, iteration: int, client_state: dict, keep_last: int, layout: dict,
         add_bias: bool = False) -> str:
    """`layout`: {"tp", "pp", "dp", "zero_stage", "world_size"}, recorded in meta.json for resharding."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    from pretrain.sharding import universal_checkpoint_info

    tag = f"iter_{iteration:07d}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: universal_checkpoint_info(add_bias)}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), os.path.join(save_dir, tag, f"rng_rank{rank:05d}.pt"))
    _barrier()  # every rank's shards and RNG are on disk
    if rank == 0:
        write_json(os.path.join(save_dir, tag, META), {**layout, "iteration": iteration, "universal": False})
        write_text(os.path.join(save_dir, tag, COMPLETE), str(iteration))
        write_text(os.path.join(save_dir, LATEST), tag)
        _prune(save_dir, keep_last, keep=tag)
    _barrier()
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
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_path = os.path.join(load_dir, tag, f"rng_rank{rank:05d}.pt")
    if os.path.exists(rng_path) and not meta.get("universal") and meta.get("world_size") == world:
        _set_rng_state(torch.load(rng_path, weights_only=True))
    return client_state
