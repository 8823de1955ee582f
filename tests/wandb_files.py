"""Read the records of a W&B offline run (run-<id>.wandb) without wandb's service: a ':W&B' header (7 bytes), then
LevelDB's log format (32 KiB blocks; each chunk: crc32c, length, type FULL/FIRST/MIDDLE/LAST) whose payloads are
wandb_internal_pb2.Record protobufs. wandb 0.31 no longer ships a Python reader (its Go core writes these)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path) -> dict[int, dict]:
    """step -> {key: value} of every wandb.log in the file."""
    out = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            step = r.history.step.num if r.history.HasField("step") else items.get("_step")
            out.setdefault(int(step), {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return out


def run_ids(path) -> set[str]:
    return {r.run.run_id for r in records(path) if r.WhichOneof("record_type") == "run"}


def config(path) -> dict:
    out = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        updates = r.config.update if kind == "config" else r.run.config.update if kind == "run" else []
        for item in updates:
            out[item.key] = json.loads(item.value_json)
    return out
