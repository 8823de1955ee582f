"""Throughput arithmetic (tokens/s, model TFLOP/s, MFU) and the metrics sinks: stdout, metrics.jsonl,
TensorBoard. Only the rank that owns the loss writes."""
from __future__ import annotations

import json
import os

import torch

# Dense bf16 peak TFLOP/s per GPU (no sparsity), by device-name fragment.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def device_peak_tflops() -> tuple[float | None, str]:
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak, name
    return None, name


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


class MetricsWriter:
    def __init__(self, log_dir: str, tensorboard_dir: str | None, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.path = os.path.join(log_dir, "metrics.jsonl")
        if enabled:
            os.makedirs(log_dir, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tensorboard_dir or os.path.join(log_dir, "tensorboard"))
            except ImportError:  # tensorboard is in requirements.txt; a bare install still trains
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v == v:
                    self.tb.add_scalar(f"train/{k}" if not k.startswith(("val", "test")) else f"eval/{k}", v,
                                       record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
