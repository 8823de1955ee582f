"""Throughput arithmetic (tokens/s, model TFLOP/s, MFU) and the metrics sinks: stdout, metrics.jsonl,
TensorBoard, and Weights & Biases when asked for (--wandb-project). Only global rank 0 writes.

W&B: one run per training run, whatever the number of ranks or restarts. Its id is drawn once and stored in the
run config, which every checkpoint carries (meta.json); a resumed or requeued run reads it back and continues the
same W&B run (resume="allow"), logging at the same step numbers. WANDB_MODE=offline writes the run under
<log-dir>/wandb for `wandb sync` on a machine with internet. wandb is optional: without it installed the trainer
runs, and asking for it says how to install it.

W&B across a signal to every process: the W&B service (wandb-core) dies on SIGTERM without flushing what it was
given (pretrain/signals.py; wandb issue 9963), and Slurm's scancel, preemption and DeepSpeed's launcher all send it
one. metrics.jsonl is the record of truth: after each session whose wandb.finish succeeded, <log-dir>/
wandb-confirmed.json names the last step W&B has for sure, and a resumed session first re-sends, from
metrics.jsonl, every step after that one up to where it resumes (later lines win, as for a reader of the file).
The service writes the offline file only when its buffer fills or the run finishes (flush interval 0), so a killed
session leaves nothing half-written to duplicate; online, the server drops a step it already has (steps only
increase within a run), so nothing is logged twice there either."""
from __future__ import annotations

import json
import os
import time

import torch

from common.files import write_json

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


class StepLog:
    """The per-step log record and line: throughput measured over each logging window (steps since the last
    record), model TFLOP/s from the model's FLOPs per token, and MFU against the device peak."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, peak_tflops: float | None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.world_size, self.peak = world_size, peak_tflops
        self.window_t0, self.window_steps = time.time(), 0

    def step_done(self) -> None:
        self.window_steps += 1

    def record(self, iteration: int, consumed_samples: int, seq_length: int, result, lr: float,
               last_step_time: float, skipped_total: int) -> dict:
        elapsed = (time.time() - self.window_t0) / max(self.window_steps, 1)
        tokens_per_sec = self.tokens_per_step / elapsed
        tflops = self.flops_per_token * tokens_per_sec / self.world_size / 1e12
        self.window_t0, self.window_steps = time.time(), 0
        return {"step": iteration, "consumed_samples": consumed_samples, "tokens": consumed_samples * seq_length,
                "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens_per_sec": tokens_per_sec,
                "tflops_per_gpu": tflops, "mfu": tflops / self.peak if self.peak else None, "step_time": elapsed,
                "last_step_time": last_step_time, "mem_gb": memory_gb(), "skipped_total": skipped_total,
                **getattr(result, "extra", {})}

    @staticmethod
    def line(r: dict, train_iters: int) -> str:
        mfu = f" | MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        if "moe_aux_loss" in r:
            mfu += f" | aux {r['moe_aux_loss']:.4f}"
        if "moe_imbalance" in r:
            mfu += f" | expert imbalance {r['moe_imbalance']:.2f}"
        return (f"iteration {r['step']:6d}/{train_iters} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | grad norm "
                f"{r['grad_norm']:.3f} | {r['tokens_per_sec']:,.0f} tok/s | {r['tflops_per_gpu']:.2f} TFLOP/s/GPU"
                f"{mfu} | {r['step_time'] * 1000:.0f} ms/step | mem {r['mem_gb']:.2f} GB")


WANDB_PIN = "wandb==0.31.0"  # the version the tests ran (requirements.txt)


def new_wandb_id() -> str:
    import secrets

    return secrets.token_hex(4)  # W&B run ids are short strings of [a-z0-9]


def scalars_of(record: dict) -> dict:
    """A metrics.jsonl record -> the W&B / TensorBoard scalars: train/<key>, eval/val_* and eval/test_*."""
    return {f"train/{k}" if not k.startswith(("val", "test")) else f"eval/{k}": v
            for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and v == v}


class MetricsWriter:
    def __init__(self, log_dir: str, tensorboard_dir: str | None, enabled: bool, wandb: dict | None = None,
                 resumed_at: int = 0):
        """wandb: None, or {"project", "name", "entity", "id", "config"} (wandb.init's arguments); resumed_at: the
        iteration this session starts from (the steps up to it that W&B may have lost are re-sent)."""
        self.enabled = enabled
        self.tb = self.wandb = None
        self.log_dir, self.wandb_id, self.wandb_last = log_dir, None, 0
        self.path = os.path.join(log_dir, "metrics.jsonl")
        if enabled and wandb:
            import wandb as wb

            self.wandb = wb.init(project=wandb["project"], name=wandb.get("name"), entity=wandb.get("entity"),
                                 id=wandb["id"], resume="allow", config=wandb["config"], dir=log_dir,
                                 settings=wb.Settings(x_transaction_log_flush_interval=0))
            self.wandb_id = wandb["id"]
            self._resend_to_wandb(resumed_at)
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
        scalars = scalars_of(record)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()
        if scalars:
            self._wandb("log", scalars, step=record["step"])
            self.wandb_last = max(self.wandb_last, record["step"])

    def close(self, exit_code: int = 0, preempted: bool = False) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            if preempted:  # it will be resumed
                self._wandb("mark_preempting")
            if self._wandb("finish", exit_code=exit_code):
                confirmed = {"run_id": self.wandb_id, "step": self.wandb_last}
                write_json(self._confirmed_path(), confirmed)
            self.wandb = None

    # ---- W&B, whose service a signal may have killed
    def _wandb(self, method: str, *args, **kwargs) -> bool:
        """Call the W&B run; once its service is gone (killed by a signal sent to every process), say so once and
        stop calling it: training and the preemption save go on, and the next session re-sends the steps."""
        if self.wandb is None:
            return False
        try:
            getattr(self.wandb, method)(*args, **kwargs)
            return True
        except Exception as e:  # noqa: BLE001 -- wandb raises socket, asyncio and its own errors here
            print(f"W&B: the service is gone ({type(e).__name__}: {str(e)[:120]}; a signal to every process kills "
                  f"it, wandb issue 9963); its steps after {self._confirmed()} are re-sent from metrics.jsonl when "
                  f"the run resumes", flush=True)
            self.wandb = None
            return False

    def _confirmed_path(self) -> str:
        return os.path.join(self.log_dir, "wandb-confirmed.json")

    def _confirmed(self) -> int:
        """The last step a finished W&B session of this run confirmed (0: none)."""
        try:
            with open(self._confirmed_path()) as f:
                saved = json.load(f)
        except FileNotFoundError:
            return 0
        return saved["step"] if saved.get("run_id") == self.wandb_id else 0

    def _resend_to_wandb(self, resumed_at: int) -> None:
        confirmed = self._confirmed()
        if resumed_at <= confirmed or not os.path.exists(self.path):
            return
        by_step: dict[int, dict] = {}
        for record in read_metrics(self.path):
            if confirmed < record.get("step", 0) <= resumed_at:
                by_step.setdefault(record["step"], {}).update(scalars_of(record))
        for step in sorted(by_step):
            self._wandb("log", by_step[step], step=step)
        self.wandb_last = resumed_at
        print(f"W&B: re-sent steps {confirmed + 1}-{resumed_at} from metrics.jsonl ({len(by_step)} logged steps "
              f"that no finished W&B session had confirmed)", flush=True)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
