"""DeepSpeed checkpoints made safe for clusters: atomic `latest`, every rank's RNG state, keep-last-N.

DeepSpeed writes `latest` from rank 0 while other ranks may still be writing their ZeRO shards; a crash then
leaves `latest` naming a partial checkpoint. We save with save_latest=False, wait for every rank, mark the tag
complete, and only then replace `latest` (temp + rename).
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
COMPLETE = "complete"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core import tensor_parallel

    state["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def save(engine, save_dir: str, iteration: int, client_state: dict, keep_last: int) -> str:
    tag = f"iter_{iteration:07d}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), os.path.join(save_dir, tag, f"rng_rank{rank:05d}.pt"))
    _barrier()  # every rank's shards and RNG are on disk
    if rank == 0:
        with open(os.path.join(save_dir, tag, COMPLETE), "w") as f:
            f.write(str(iteration))
        tmp = os.path.join(save_dir, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(save_dir, LATEST))
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
    _, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer,
                                             load_lr_scheduler_states=load_optimizer,
                                             load_module_only=not load_optimizer)
    if client_state is None:
        raise RuntimeError(f"{load_dir}/{tag}: DeepSpeed could not load it (see the log above)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_path = os.path.join(load_dir, tag, f"rng_rank{rank:05d}.pt")
    saved_world = client_state.get("world_size", world)
    if os.path.exists(rng_path) and saved_world == world:
        _set_rng_state(torch.load(rng_path, weights_only=False))  # our own file: python/numpy states
    return client_state
