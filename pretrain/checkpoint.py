"""Checkpoints that resume under any layout, that nobody can plant code in, and that say when they are damaged.

Why not DeepSpeed's save_checkpoint/load_checkpoint (0.19.8): its files are pickles loaded with
weights_only=False (a payload in a shared checkpoint runs on resume); they are laid out per ZeRO stage, TP and
PP, so another layout needs ds_to_universal, which fails on ZeRO-2 with DP > 1 and whose output ZeRO-3 cannot
load at TP > 1 (docs/FINDINGS.md, "DeepSpeed checkpoints"); and they carry no checksums. What every layout
shares is the engine's in-memory state, which pretrain/zero_state.py reads and writes as slots: each rank
saves the fp32 master weights and Adam moments it owns, by canonical parameter name and element range, and any
layout reads back the ranges it owns. Same layout: every rank reads exactly what it wrote (and its RNG state),
so the resumed run is bit-identical.

<save>/<tag>/ (tag = iter_NNNNNNN):
  rank00000.safetensors ...  one file per rank: its slots under "<state>/<tp rank>/<first element>/<name>"
                             (state: fp32, exp_avg, exp_avg_sq), its RNG states under "rng/..."
  meta.json                  written by rank 0 once every rank's file is on disk: iteration, consumed samples,
                             Adam step, layout, model and run config, every file's size and xxh3-128 hash
  complete                   written last: the tag is whole
<save>/latest                names the newest complete tag; replaced (atomically) only after `complete`
<save>/best                  --keep-best: names the tag with the best validation metric (pretrain/early_stop.py);
                             written after `latest`, never pruned; a damaged or missing one falls back to the best
                             verified tag by the values the tags' meta.json recorded

Resume verifies the files against meta.json (each rank checks a share); a damaged tag is reported file by file,
set aside as <tag>.damaged, and the previous complete tag is used, saying so. No pickle is ever loaded.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from common.files import NoSpaceError, atomic_path, file_xxh3, is_no_space, write_json, write_text
from pretrain import sharding, zero_state
from pretrain.parallel import Layout, barrier, is_rank0, log, rank, world_size

FORMAT, VERSION = "dsllm-checkpoint", 1
LATEST, COMPLETE, META, BEST = "latest", "complete", "meta.json", "best"
TAG = re.compile(r"^iter_\d{7}$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is; names the file and what to do."""


class SaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, say); the partial one was removed."""


def tag_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def layout_meta(layout: Layout) -> dict:
    return {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "ep": layout.ep, "dp": layout.dp,
            "zero_stage": layout.zero_stage, "world_size": layout.world_size}


# ------------------------------------------------------------------------------------------------ save
def save(engine, save_dir: str, iteration: int, consumed_samples: int, layout: Layout, model_config: dict,
         run_config: dict, keep_last: int, trainer_state: dict | None = None, best: bool = False) -> str:
    """Every rank writes its file; rank 0 then writes meta.json, `complete`, `latest` (and `best` when `best`).
    A failure on any rank (a full disk, say) fails the save on every rank, and the partial tag is removed.
    trainer_state: what the loop keeps beside the engine (early stopping's counters), back from load().
    The same steps as an asynchronous save (pretrain/async_save.py), in this thread and on the training group."""
    tag_dir = prepare_tag(save_dir, iteration)
    meta = meta_fields(engine, iteration, consumed_samples, layout, model_config, run_config, trainer_state)
    entry, error = {}, None
    try:
        entry = write_snapshot(tag_dir, snapshot(engine))
    except Exception as e:  # reported to every rank in commit(), so nobody waits for a file that will not come
        error = describe_failure(e, tag_dir)
    return commit(save_dir, tag_dir, (entry, error), meta, keep_last, best)


def prepare_tag(save_dir: str, iteration: int, group=None) -> str:
    """Rank 0 makes the tag's directory (removing a partial one of a run that died); every rank waits for it."""
    tag_dir = os.path.join(save_dir, tag_name(iteration))
    if is_rank0():
        os.makedirs(save_dir, exist_ok=True)
        if os.path.isdir(tag_dir) and not os.path.exists(os.path.join(tag_dir, COMPLETE)):
            shutil.rmtree(tag_dir)  # a partial save of ours from a run that died; it is rewritten now
        os.makedirs(tag_dir, exist_ok=True)
    barrier(group)
    return tag_dir


def meta_fields(engine, iteration: int, consumed_samples: int, layout: Layout, model_config: dict,
                run_config: dict, trainer_state: dict | None) -> dict:
    """meta.json's content but the files and the save time, read from the engine at the save step."""
    return {"format": FORMAT, "version": VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
            "adam_step": zero_state.adam_step(engine), "layout": layout_meta(layout), "model_config": model_config,
            "run_config": run_config, "trainer_state": trainer_state or {}}


def describe_failure(e: Exception, tag_dir: str) -> str:
    if is_no_space(e):
        return f"rank {rank()}: {NoSpaceError(tag_dir)}"
    return f"rank {rank()}: {e}"


def commit(save_dir: str, tag_dir: str, mine: tuple[dict, str | None], meta: dict, keep_last: int, best: bool,
           group=None) -> str:
    """Every rank's (file entry, error) gathered; any error fails the save on every rank (the partial tag removed),
    else rank 0 writes meta.json, `complete`, `latest`, `best` and prunes, and every rank waits for it."""
    entries = _gather(mine, group)
    errors = [err for _, err in entries if err]
    if errors:
        if is_rank0():
            shutil.rmtree(tag_dir, ignore_errors=True)
        barrier(group)
        raise SaveError(f"saving {tag_dir} failed; the partial checkpoint was removed: " + "; ".join(errors))
    if is_rank0():
        files = {k: v for e, _ in entries for k, v in e.items()}
        write_json(os.path.join(tag_dir, META), {**meta, "files": files,
                                                 "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        write_text(os.path.join(tag_dir, COMPLETE), str(meta["iteration"]))
        write_text(os.path.join(save_dir, LATEST), os.path.basename(tag_dir))
        if best:
            write_text(os.path.join(save_dir, BEST), os.path.basename(tag_dir))
        _prune(save_dir, keep_last, keep=os.path.basename(tag_dir))
    barrier(group)
    return tag_dir


@dataclass
class Snapshot:
    """One rank's share of a checkpoint, copied out of the engine: what its file will hold."""
    name: str  # rankNNNNN.safetensors
    tensors: dict
    metadata: dict

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def snapshot(engine, pin: bool = False) -> Snapshot:
    """This rank's fp32 masters, Adam moments (the slots it owns) and RNG states as host tensors of their own (the
    training step may change the engine's at once). pin: page-locked host memory (GPU: a faster copy)."""
    from megatron.core import parallel_state

    # the rank within ZeRO's group (DP x CP): one of them writes a replicated slot
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    tensors = {}
    for slot in zero_state.slots(engine):
        if slot.replicated and dp_rank != 0:
            continue
        for state in zero_state.STATES:
            key = f"{state}/{tp_rank}/{slot.start}/{slot.name}"
            value = zero_state.read(engine, slot, state).detach().float()
            host = torch.empty(value.shape, dtype=torch.float32, pin_memory=pin)
            tensors[key] = host.copy_(value)
    rng_tensors, rng_meta = _rng_state()
    tensors.update({k: v.clone() for k, v in rng_tensors.items()})  # (a tracker's state may be the live tensor)
    # One metadata key: safetensors writes its metadata map in a per-process random order (a Rust HashMap), so
    # two keys made the same state give files of other bytes (and hashes); the TP rank is in every tensor's name.
    return Snapshot(f"rank{rank():05d}.safetensors", tensors, {"rng": json.dumps(rng_meta)})


def write_snapshot(tag_dir: str, snap: Snapshot) -> dict:
    """The rank's file, written atomically -> its meta.json entry (size and xxh3-128)."""
    from safetensors.torch import save_file

    path = os.path.join(tag_dir, snap.name)
    with atomic_path(path) as tmp:
        save_file(snap.tensors, tmp, metadata=snap.metadata)
    return {snap.name: {"bytes": os.path.getsize(path), "xxh3_128": file_xxh3(path)}}


def _gather(obj, group=None) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def mark_best(save_dir: str, tag: str) -> None:
    """`best` names `tag`, already saved (rank 0 writes; collective)."""
    if is_rank0():
        write_text(os.path.join(save_dir, BEST), tag)
    barrier()


def _prune(save_dir: str, keep_last: int, keep: str) -> None:
    """Remove the oldest complete tags beyond `keep_last` (only tags of ours: iter_NNNNNNN with `complete`),
    never `keep` nor the one `best` names."""
    if keep_last <= 0:
        return
    try:
        best = read_pointer(save_dir, BEST)
    except CheckpointError:
        best = None
    for tag in complete_tags(save_dir)[:-keep_last]:
        if tag not in (keep, best):
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


# ------------------------------------------------------------------------------------------------ RNG
def _rng_state() -> tuple[dict, dict]:
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[f"rng/megatron/{name}"] = state.cpu()
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    from megatron.core import tensor_parallel

    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    tracker = {k[len("rng/megatron/"):]: v for k, v in tensors.items() if k.startswith("rng/megatron/")}
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


# ------------------------------------------------------------------------------------------------ find
def read_latest(save_dir: str) -> str | None:
    """The tag `latest` names, checked to be one of ours (never a path to follow elsewhere), or None."""
    return read_pointer(save_dir, LATEST)


def read_pointer(save_dir: str, name: str) -> str | None:
    """The tag <save_dir>/<name> (latest, best) names, checked to be one of ours, or None."""
    path = os.path.join(save_dir, name)
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        tag = f.read().strip()
    if not TAG.match(tag):
        raise CheckpointError(f"{path} holds {tag[:80]!r}, not a checkpoint tag (iter_NNNNNNN); fix or remove it")
    return tag


def complete_tags(save_dir: str) -> list[str]:
    """Complete checkpoint tags in `save_dir`, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    return sorted(t for t in os.listdir(save_dir)
                  if TAG.match(t) and os.path.exists(os.path.join(save_dir, t, COMPLETE)))


def saved_model_config(load_dir: str | None) -> dict | None:
    """The model_config of the checkpoint a run would resume from (the tag directory itself, or the newest
    complete tag), unverified: the shape a resumed run builds before find_resume checks the files. None when
    there is none to read."""
    if not load_dir:
        return None
    tags = [load_dir] if os.path.exists(os.path.join(load_dir, META)) else \
        [os.path.join(load_dir, t) for t in reversed(complete_tags(load_dir))]
    for tag_dir in tags:
        try:
            return read_meta(tag_dir)["model_config"]
        except CheckpointError:
            continue
    return None


def read_meta(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, META)
    try:
        with open(path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else meta!r}, expected "
                             f"{FORMAT!r}")
        missing = [k for k in ("iteration", "consumed_samples", "layout", "model_config", "files") if k not in meta]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {tag_dir} is not a checkpoint written by this trainer") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged or not ours ({type(e).__name__}: {e})") from None
    for name in meta["files"]:
        if os.sep in name or name.startswith("."):
            raise CheckpointError(f"{path} lists {name!r}, which is not a file name inside the checkpoint")
    return meta


def verify(tag_dir: str) -> list[str]:
    """Problems with a tag (missing, truncated or changed files), found by every rank checking a share of the
    files; the same list on every rank."""
    problems = []
    try:
        meta = read_meta(tag_dir)
    except CheckpointError as e:
        meta, problems = None, [str(e)]
    if meta is not None:
        names = sorted(meta["files"])
        for name in names[rank()::world_size()]:
            want, path = meta["files"][name], os.path.join(tag_dir, name)
            if not os.path.exists(path):
                problems.append(f"{path} is missing")
            elif os.path.getsize(path) != want["bytes"]:
                problems.append(f"{path} has {os.path.getsize(path)} bytes, meta.json says {want['bytes']}")
            elif file_xxh3(path) != want["xxh3_128"]:
                problems.append(f"{path}: content changed since it was saved (xxh3-128 differs)")
    return sorted({p for ps in _gather(problems) for p in ps})


def find_resume(load_dir: str | None) -> str | None:
    """The checkpoint to resume from: the tag `latest` names, else the newest complete one; verified, falling back
    to older complete tags when damaged (each damaged tag is set aside as <tag>.damaged). None when the
    directory holds no checkpoint. Collective: every rank gets the same answer."""
    if not load_dir:
        return None
    if os.path.exists(os.path.join(load_dir, META)):  # a tag directory itself
        problems = verify(load_dir)
        if problems:
            raise CheckpointError(f"checkpoint {load_dir} is damaged:\n  " + "\n  ".join(problems))
        return load_dir
    decision = [None]
    if is_rank0():
        try:
            decision = [("ok", _candidates(load_dir))]
        except CheckpointError as e:
            decision = [("error", str(e))]
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    status, order = decision[0]
    if status == "error":
        raise CheckpointError(order)
    for i, tag in enumerate(order):
        tag_dir = os.path.join(load_dir, tag)
        problems = verify(tag_dir)
        if not problems:
            if i:
                log(f"resuming from {tag}, the newest checkpoint that verifies")
            return tag_dir
        log(f"error: checkpoint {tag_dir} is damaged:\n  " + "\n  ".join(problems))
        if is_rank0():
            aside = f"{tag_dir}.damaged"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(tag_dir, aside)
            log(f"  moved it to {aside}")
        barrier()
    if order:
        raise CheckpointError(f"every checkpoint in {load_dir} is damaged (moved to *.damaged); restore one from a "
                              f"backup, or pass --save/--load to a new directory to start over")
    return None


def _candidates(load_dir: str) -> list[str]:
    """Tags to try, best first: the one `latest` names, then every other complete tag, newest first."""
    tags = complete_tags(load_dir)
    latest = read_latest(load_dir)
    if latest is None and tags:
        log(f"warning: {load_dir} has no '{LATEST}' file; resuming from the newest complete checkpoint {tags[-1]} "
            f"instead of starting over")
    if latest is not None and latest not in tags:
        log(f"warning: {load_dir}/{LATEST} names {latest}, which is not a complete checkpoint; trying older ones")
    return ([latest] if latest in tags else []) + [t for t in reversed(tags) if t != latest]


def resolve_tag(path: str, tag: str | None = None) -> str:
    """For the offline tools (export, convert): a tag directory, given directly, by --tag, or the one `latest`
    names (else the newest complete one); verified. Never falls back silently: a damaged tag is an error, and
    --tag best says which tag it takes instead of a damaged or missing `best`."""
    if tag == BEST:
        return _best_tag_dir(path)
    if tag is not None:
        if not TAG.match(tag):
            raise CheckpointError(f"--tag {tag!r} is not a checkpoint tag (iter_NNNNNNN, or best)")
        tag_dir = os.path.join(path, tag)
    elif os.path.exists(os.path.join(path, META)):
        tag_dir = path
    else:
        order = _candidates(path) if os.path.isdir(path) else []
        if not order:
            raise FileNotFoundError(f"{path}: no complete checkpoint here (no '{LATEST}', no iter_*/{COMPLETE})")
        tag_dir = os.path.join(path, order[0])
    problems = verify(tag_dir)
    if problems:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged:\n  " + "\n  ".join(problems) +
                              "\n  pass --tag with an earlier one (ls the directory for iter_*)")
    return tag_dir


def _best_tag_dir(path: str) -> str:
    """The tag <path>/best names, verified; when it is missing or damaged, the best of the verified tags that
    recorded their own evaluation (meta.json trainer_state.early_stop: last_step == iteration), saying so."""
    try:
        named = read_pointer(path, BEST)
        why = None if named else f"{os.path.join(path, BEST)} is missing (was the run trained with --keep-best?)"
    except CheckpointError as e:
        named, why = None, str(e)
    if named:
        tag_dir = os.path.join(path, named)
        problems = verify(tag_dir) if named in complete_tags(path) else [f"{tag_dir} is not a complete checkpoint"]
        if not problems:
            return tag_dir
        why = f"{os.path.join(path, BEST)} names {named}, which is damaged or gone: " + "; ".join(problems)
    scored = []  # (value, tag, metric, mode)
    for tag in complete_tags(path):
        try:
            meta = read_meta(os.path.join(path, tag))
        except CheckpointError:
            continue
        state = (meta.get("trainer_state") or {}).get("early_stop") or {}
        if state.get("last_step") == meta["iteration"] and state.get("last_value") is not None:
            if not verify(os.path.join(path, tag)):
                scored.append((state["last_value"], tag, state["metric"], state["mode"]))
    if not scored:
        raise CheckpointError(f"{why}; no other checkpoint in {path} recorded its validation value: pass --tag "
                              f"iter_NNNNNNN (ls the directory)")
    pick = min if scored[0][3] == "min" else max
    value, tag, metric, _ = pick(scored, key=lambda x: x[0])
    log(f"warning: {why}; using {tag} instead, the best verified checkpoint ({metric} {value:.6g})")
    return os.path.join(path, tag)


# ------------------------------------------------------------------------------------------------ load
def load(engine, tag_dir: str, layout: Layout, model_shapes: dict, load_optimizer: bool = True) -> dict:
    """Load `tag_dir` into an engine of any layout; -> its meta.json (iteration, consumed_samples, ...) and
    `same_layout` (then the RNG states were restored too, and the run continues bit for bit)."""
    meta = read_meta(tag_dir)
    reader = CheckpointReader(tag_dir, meta)
    load_states(engine, reader, layout, model_shapes, load_optimizer and reader.has_state("exp_avg"))
    engine.global_steps, engine.global_samples = meta["iteration"], meta["consumed_samples"]
    same_layout = {"cp": 1, "ep": 1, **meta["layout"]} == layout_meta(layout)  # (saved before --cp/--ep: 1)
    if same_layout:
        tensors, rng_meta = reader.rank_rng(rank())
        _set_rng_state(tensors, rng_meta)
    return {**meta, "same_layout": same_layout}


def load_states(engine, reader, layout: Layout, model_shapes: dict, load_optimizer: bool) -> None:
    """Every slot this rank holds, from `reader` (a CheckpointReader, or pretrain.hf.HFReader for weights only):
    fp32 masters, and Adam's moments and step when `load_optimizer`; then the model's own weights."""
    if reader.shapes != model_shapes:
        diff = sorted(set(reader.shapes.items()) ^ set(model_shapes.items()))[:4]
        raise CheckpointError(f"{reader.dir} holds another model than this run builds (first differences, "
                              f"source vs run: {diff}); pass the model flags it was trained with")
    from megatron.core import parallel_state

    tp, tp_rank = layout.tp, parallel_state.get_tensor_model_parallel_rank()
    states = zero_state.STATES if load_optimizer else ("fp32",)
    if load_optimizer:
        zero_state.prepare_states(engine, int(reader.meta.get("adam_step", 0)))
    for slot in zero_state.slots(engine):
        for state in states:
            values = reader.local_range(slot.name, state, tp, tp_rank, slot.start, slot.numel)
            zero_state.write(engine, slot, state, values)
    zero_state.refresh_model_weights(engine)


class CheckpointReader:
    """Reads parameters out of a checkpoint's files, by canonical name: whole (TP-merged) or the range one rank
    of some layout owns. Only safetensors are opened (no pickle); only the bytes asked for are read."""

    def __init__(self, tag_dir: str, meta: dict | None = None):
        from pretrain.config import ModelConfig

        self.dir = tag_dir
        self.meta = meta or read_meta(tag_dir)
        self.cfg = ModelConfig(**self.meta["model_config"])
        self.shapes = self.cfg.parameter_shapes()
        self.tp = int(self.meta["layout"]["tp"])
        self.index: dict[tuple[str, str, int], list[tuple[int, int, str, str]]] = {}  # -> [(start, numel, ...)]
        self._files: dict = {}
        for name in sorted(self.meta["files"]):
            self._index_file(name)

    def _open(self, name: str):
        from safetensors import safe_open

        if name not in self._files:
            path = os.path.join(self.dir, name)
            try:
                self._files[name] = safe_open(path, framework="pt")
            except Exception as e:
                raise CheckpointError(f"{path} cannot be read as safetensors ({e}); the file is damaged") from None
        return self._files[name]

    def _index_file(self, name: str) -> None:
        f = self._open(name)
        for key in f.keys():
            if key.startswith("rng/"):
                continue
            state, tp_rank, start, param = key.split("/", 3)
            numel = int(np.prod(f.get_slice(key).get_shape()))
            self.index.setdefault((param, state, int(tp_rank)), []).append((int(start), numel, name, key))

    def names(self) -> list[str]:
        return list(self.shapes)

    def has_state(self, state: str) -> bool:
        return any(s == state for _, s, _ in self.index)

    def _range(self, name: str, state: str, tp_rank: int, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened parameter as TP rank `tp_rank` of the saved layout held it."""
        out = torch.empty(hi - lo, dtype=torch.float32)
        filled = torch.zeros(hi - lo, dtype=torch.bool)
        for start, numel, fname, key in self.index.get((name, state, tp_rank), []):
            a, b = max(lo, start), min(hi, start + numel)
            if a < b:  # a tied weight is saved by two pipeline stages: the copies overlap, and are equal
                out[a - lo:b - lo] = self._open(fname).get_slice(key)[a - start:b - start]
                filled[a - lo:b - lo] = True
        if not bool(filled.all()):
            raise CheckpointError(f"{self.dir}: {state} of {name} (TP rank {tp_rank}) lacks "
                                  f"{int((~filled).sum())} of elements [{lo}, {hi}); the checkpoint is incomplete")
        return out

    def tp_local(self, name: str, state: str, tp_rank: int) -> torch.Tensor:
        shape = sharding.local_shape(name, self.shapes[name], self.tp)
        rank_in_file = tp_rank if sharding.split_rule(name)[0] is not None else 0  # replicated: any copy
        return self._range(name, state, rank_in_file, 0, int(np.prod(shape))).view(shape)

    def full(self, name: str, state: str = "fp32") -> torch.Tensor:
        """The whole parameter (tensor-parallel slices merged), fp32."""
        if name not in self.shapes:
            raise KeyError(f"{self.dir}: the model has no parameter {name!r}")
        if sharding.split_rule(name)[0] is None:
            return self.tp_local(name, state, 0)
        return sharding.merge(name, [self.tp_local(name, state, r) for r in range(self.tp)])

    def local_range(self, name: str, state: str, tp: int, tp_rank: int, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of TP rank `tp_rank`'s slice of `name` under a layout with `tp` ranks."""
        if tp == self.tp or sharding.split_rule(name)[0] is None:
            rank_in_file = tp_rank if sharding.split_rule(name)[0] is not None else 0
            return self._range(name, state, rank_in_file, start, start + numel)
        local = sharding.shard(name, self.full(name, state), tp_rank, tp)
        return local.reshape(-1)[start:start + numel].clone()

    def rank_rng(self, global_rank: int) -> tuple[dict, dict]:
        name = f"rank{global_rank:05d}.safetensors"
        f = self._open(name)
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith("rng/")}
        return tensors, json.loads(f.metadata()["rng"])
