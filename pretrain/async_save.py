"""--async-save: a checkpoint that does not stop training (issue 33).

At a save step every rank copies its share (fp32 masters, Adam moments, RNG states: pretrain.checkpoint.snapshot)
into host memory of its own and goes on training; a background thread writes the same file a synchronous save
writes, then the commit runs there too: every rank's (file, error) gathered, meta.json, `complete`, `latest`,
`best`, pruning (pretrain.checkpoint.commit). Megatron's --async-save, torchtitan's DCP async_mode and OLMo-core's
save_async do the same; the format is unchanged, so a tag written this way is read, resumed and exported like any.

- Its collectives run on a process group of their own (gloo, made once at setup on every rank): never interleaved
  with the training groups' (a collective of the step and one of the writer on the same group from two threads
  would pair up wrongly), and the collective tracker behind the straggler report and the stall watchdog does not
  count them (pretrain/monitor.py counts the main thread only).
- At most one save in flight: the next save, the end of training, a preemption and an early stop first wait for it
  (the log says how long). The loop polls after every step; the rank's verdict (written, failed) is agreed by one
  MIN all-reduce of the training group, so every rank learns that the save ended, and how, at the same step.
- A failure in the background (a full disk, a rank dying mid-write) is the synchronous save's: the partial tag is
  removed, `latest` still names the previous tag, and the run stops with checkpoint.SaveError (exit code 5).
- Host memory: one snapshot per rank at a time (its state bytes: pretrain.plan --async-save reports them).
"""
from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from pretrain import checkpoint
from pretrain.parallel import log


class AsyncSaver:
    """One background save at a time; `save` returns at once, `wait` blocks until the one in flight is committed
    (raising its SaveError), `poll` checks after each step, agreed over every rank."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.thread: threading.Thread | None = None
        self.result: dict = {}
        self.started = 0.0
        self.in_flight_tag: str | None = None

    @property
    def busy(self) -> bool:
        return self.thread is not None

    def save(self, engine, save_dir: str, iteration: int, consumed_samples: int, layout, model_config: dict,
             run_config: dict, keep_last: int, trainer_state: dict | None = None, best: bool = False) -> str:
        """Snapshot now, write and commit in the background; -> the tag directory it will be."""
        self.wait(f"before the save of iteration {iteration}")
        t0 = time.time()
        tag_dir = checkpoint.prepare_tag(save_dir, iteration, self.group)
        meta = checkpoint.meta_fields(engine, iteration, consumed_samples, layout, model_config, run_config,
                                      trainer_state)
        snap = checkpoint.snapshot(engine, pin=torch.cuda.is_available())
        blocked = time.time() - t0
        self.result, self.started, self.in_flight_tag = {}, time.time(), tag_dir
        self.thread = threading.Thread(target=self._write, name="async-save", daemon=True,
                                       args=(save_dir, tag_dir, snap, meta, keep_last, best))
        self.thread.start()
        log(f"saving {tag_dir} in the background ({snap.bytes / 2**20:.1f} MiB from this rank; the loop was held "
            f"{blocked:.2f} s for the copy)")
        return tag_dir

    def _write(self, save_dir, tag_dir, snap, meta, keep_last, best) -> None:
        entry, error = {}, None
        try:
            entry = checkpoint.write_snapshot(tag_dir, snap)
        except Exception as e:  # every rank learns it in commit()
            error = checkpoint.describe_failure(e, tag_dir)
        del snap  # the host copy goes before the commit's wait for the other ranks
        try:
            checkpoint.commit(save_dir, tag_dir, (entry, error), meta, keep_last, best, self.group)
            self.result = {"ok": tag_dir}
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, raised there
            self.result = {"error": e}

    def poll(self) -> str | None:
        """After a step, on every rank: -> the tag committed since the last poll (None while writing, or when no
        save is in flight); raises the save's SaveError on every rank at the same step."""
        if not self.busy:
            return None
        done = torch.tensor([0.0 if self.thread.is_alive() else 1.0])
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item() == 0:
            return None
        return self._finish()

    def wait(self, why: str) -> str | None:
        """Block until the save in flight is committed (-> its tag) or failed (raises its SaveError)."""
        if not self.busy:
            return None
        t0 = time.time()
        self.thread.join()
        waited = time.time() - t0
        if waited > 0.05:
            log(f"waited {waited:.1f} s for the background save of {self.in_flight_tag} ({why})")
        return self._finish()

    def _finish(self) -> str:
        self.thread.join()
        self.thread = None
        result, self.result = self.result, {}
        if "error" in result:
            raise result["error"]
        log(f"saved checkpoint {result['ok']} (in the background, {time.time() - self.started:.1f} s)")
        return result["ok"]
