"""Watching a long run from the inside: which rank is slow (stragglers), what a stuck rank is doing (stall
watchdog), and the collective each rank is in.

Why per-rank "busy" time and not step time: training is synchronous, so every rank's wall-clock step time is the
same (the fast ranks wait for the slow one inside a collective). What differs is how the step was spent. Each
rank splits its step into time waiting for data (the loader), time blocked in torch.distributed collectives
(CollectiveTracker wraps them), and the rest: its own work ("busy"). A straggler is a rank whose busy time is well
above the median of the ranks doing the same work (the same pipeline stage; different stages differ by design),
or whose data wait is. Megatron's StragglerDetector compares per-rank GPU kernel time for the same reason.

Limits: what runs outside torch.distributed is counted as busy (DeepSpeed's own shared-memory all-reduce on
CPU, NCCL kernels that a GPU stream waits for without the host blocking). The figures name the rank that makes
the others wait; they are not a profile.

The watchdog is a thread per rank. When a step runs longer than --stall-factor x the median of the recent steps
(at least --stall-min-seconds), it writes <log-dir>/stall-rank<R>-step<N>.txt: the rank, its host, the step, how
long it has run, the collective in progress (and since when), and every thread's Python stack (faulthandler); on
GPU also torch's NCCL flight recorder (when it is enabled: TORCH_NCCL_TRACE_BUFFER_SIZE > 0). Once per step;
it never stops or kills anything (a slow step may be a healthy one: --dist-timeout-minutes ends a dead job).
"""
from __future__ import annotations

import collections
import faulthandler
import functools
import os
import socket
import statistics
import threading
import time

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# The torch.distributed entry points megatron-core and DeepSpeed call (looked up on the module at call time).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "barrier", "all_to_all_single", "send", "recv", "all_gather_object",
               "broadcast_object_list", "monitored_barrier")


class CollectiveTracker:
    """Wraps torch.distributed's collectives: cumulative seconds blocked in them, how many of each were called and
    how many bytes each kind moved (the planner's collective inventory is checked against these), and the one in
    progress."""

    def __init__(self, count: bool = False):
        self.blocked_s = 0.0
        # with count: outermost calls by (name, ranks in the group), an asynchronous collective's wait has no
        # group: 0; and bytes by (kind, ranks in the group), kind one of BYTE_KINDS' values. Off in training (a
        # group-size lookup per call that nothing reads).
        self.count, self.counts, self.bytes = count, collections.Counter(), collections.Counter()
        self.current: tuple[str, float] | None = None  # (name, start time) while inside one
        self._originals = {}

    def install(self) -> "CollectiveTracker":
        """Call it outside any collective (never inside a coalescing manager: it compares the functions it
        recorded with the module's by identity)."""
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None or getattr(fn, "_tracked", False):
                continue
            self._originals[name] = fn
            setattr(dist, name, self._wrap(name, fn))
        # An asynchronous collective (ZeRO-3's prefetched all-gathers, overlapped reduce-scatters) blocks in
        # Work.wait(), not in the call that started it.
        work = torch._C._distributed_c10d.Work
        if not getattr(work.wait, "_tracked", False):
            self._originals["Work.wait"] = work.wait
            work.wait = self._wrap("wait (an asynchronous collective)", work.wait, grouped=False)
        if self.count:
            # DeepSpeed's comm backend and megatron's mappings keep their own references to
            # all_gather_into_tensor / reduce_scatter_tensor, taken at import, so the wrappers above never see
            # ZeRO's gathers and reduce-scatters. In torch 2.13 both forward to these module globals, looked up at
            # call time (as the coalescing manager's identity checks are): their bytes are counted here.
            for name in SINGLE_TENSOR:
                fn = getattr(c10d, name)
                if not getattr(fn, "_tracked", False):
                    self._originals["c10d." + name] = fn
                    setattr(c10d, name, self._wrap_bytes(name, fn))
        return self

    def uninstall(self) -> None:
        for name, fn in self._originals.items():
            if name == "Work.wait":
                torch._C._distributed_c10d.Work.wait = fn
            elif name.startswith("c10d."):
                setattr(c10d, name[len("c10d."):], fn)
            else:
                setattr(dist, name, fn)
        self._originals = {}

    def _wrap(self, name, fn, grouped=True):
        @functools.wraps(fn)
        def tracked(*args, **kwargs):
            # nested (e.g. barrier -> all_reduce): the outer one is timed; another thread's (the background
            # checkpoint writer's, pretrain/async_save.py) are not the step's
            if self.current is not None or threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            if self.count and grouped:
                size = _group_size(args, kwargs)
                self.counts[name, size] += 1
                if name in BYTE_KINDS:
                    self.bytes[BYTE_KINDS[name], size] += _tensor_bytes(name, args, kwargs)
            elif self.count:
                self.counts[name, 0] += 1
            self.current = (name, time.time())
            try:
                return fn(*args, **kwargs)
            finally:
                self.current = None
                self.blocked_s += time.perf_counter() - t0

        tracked._tracked = True
        return tracked

    def _wrap_bytes(self, name, fn):
        @functools.wraps(fn)
        def tracked(*args, **kwargs):
            if threading.current_thread() is threading.main_thread():
                self.bytes[BYTE_KINDS[name], _group_size(args, kwargs)] += _tensor_bytes(name, args, kwargs)
            return fn(*args, **kwargs)

        tracked._tracked = True
        return tracked

    def in_progress(self) -> str:
        if self.current is None:
            return "none (the rank is not inside a torch.distributed collective)"
        name, since = self.current
        return f"{name}, for {time.time() - since:.1f} s"


# What each call moves, by kind (the planner's op names; send and receive are "p2p"): the tensor for all-reduce,
# broadcast and point-to-point, the gathered output of an all-gather, the input of a reduce-scatter (so padding
# to a multiple of the group counts, as it is sent). all_gather_into_tensor and reduce_scatter_tensor are absent:
# they forward to SINGLE_TENSOR's functions, counted there (once).
BYTE_KINDS = {"all_reduce": "all_reduce", "broadcast": "broadcast", "send": "p2p", "recv": "p2p",
              "all_gather": "all_gather", "all_gather_single": "all_gather", "reduce_scatter": "reduce_scatter",
              "reduce_scatter_single": "reduce_scatter", "all_to_all_single": "all_to_all"}
SINGLE_TENSOR = ("all_gather_single", "reduce_scatter_single")


def _tensor_bytes(name: str, args, kwargs) -> int:
    def size(t):
        return sum(map(size, t)) if isinstance(t, (list, tuple)) else t.numel() * t.element_size()

    if name in ("all_reduce", "broadcast", "send", "recv"):
        return size(kwargs.get("tensor", args[0] if args else None))
    if name in ("all_gather", "all_gather_single"):  # (output list or tensor, input)
        return size(kwargs.get("tensor_list", kwargs.get("output_tensor", args[0] if args else None)))
    # reduce_scatter(output, input_list), reduce_scatter_single(output, input), all_to_all_single(output, input)
    return size(kwargs.get("input_list", kwargs.get("input", args[1] if len(args) > 1 else None)))


def _group_size(args, kwargs) -> int:
    group = kwargs.get("group", next((a for a in args if isinstance(a, dist.ProcessGroup)), None))
    try:
        return dist.get_world_size(group)
    except (RuntimeError, ValueError):  # not a group this rank belongs to, or no process group yet
        return 0


class TimedIterator:
    """Counts the seconds spent waiting for the next item (the data loader's share of a step)."""

    def __init__(self, it):
        self.it, self.wait_s = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.wait_s += time.perf_counter() - t0


class StragglerMonitor:
    """Per-rank step, data-wait and busy seconds over a log interval, gathered onto every rank; the report names
    the slowest rank of each pipeline stage when it is more than `threshold` above that stage's median."""

    def __init__(self, tracker: CollectiveTracker, data: TimedIterator, threshold: float, pp_stage: int):
        self.tracker, self.data, self.threshold = tracker, data, threshold
        self.stage = pp_stage
        self.hosts = _gather_hosts()
        self._reset()

    def _reset(self):
        self.steps, self.wall = 0, 0.0
        self.blocked0, self.wait0 = self.tracker.blocked_s, self.data.wait_s

    def step_done(self, seconds: float) -> None:
        self.steps += 1
        self.wall += seconds

    def report(self) -> dict:
        """Collective over every rank: call at the same step everywhere. -> the metrics record's fields."""
        n = max(self.steps, 1)
        wait = (self.data.wait_s - self.wait0) / n
        blocked = (self.tracker.blocked_s - self.blocked0) / n
        step = self.wall / n
        mine = torch.tensor([step, wait, max(step - wait - blocked, 0.0), float(self.stage)], dtype=torch.float64)
        rows = _all_gather_rows(mine)
        self._reset()
        return summarize(rows, self.hosts, self.threshold)


def summarize(rows: list[list[float]], hosts: list[str], threshold: float) -> dict:
    """rows[rank] = [step_s, data_wait_s, busy_s, pipeline stage] -> {"ranks": ..., "stragglers": [...]}: per
    stage, a rank whose busy or data-wait seconds exceed the stage median by more than `threshold` (relative) and
    10 ms (absolute: idle ranks differ by noise)."""
    ranks = {"step_s": [round(r[0], 4) for r in rows], "data_wait_s": [round(r[1], 4) for r in rows],
             "busy_s": [round(r[2], 4) for r in rows]}
    stragglers = []
    for stage in sorted({int(r[3]) for r in rows}):
        members = [i for i, r in enumerate(rows) if int(r[3]) == stage]
        if len(members) < 2:
            continue
        for key, col in (("busy_s", 2), ("data_wait_s", 1)):
            median = statistics.median(rows[i][col] for i in members)
            worst = max(members, key=lambda i: rows[i][col])
            value = rows[worst][col]
            if value > median * (1 + threshold) and value - median > 0.01:
                stragglers.append({"rank": worst, "host": hosts[worst], "pp_stage": stage, "what": key,
                                   "seconds": round(value, 4), "median_seconds": round(median, 4),
                                   "slower_by": round(value / median - 1, 3) if median > 0 else None})
    return {"ranks": ranks, "stragglers": stragglers}


def straggler_lines(summary: dict) -> list[str]:
    what = {"busy_s": "own work (not data, not collectives)", "data_wait_s": "waiting for data"}
    lines = []
    for s in summary["stragglers"]:
        by = f"+{s['slower_by']:.0%}" if s["slower_by"] is not None else "vs ~0"
        lines.append(f"straggler: rank {s['rank']} ({s['host']}, pipeline stage {s['pp_stage']}) spends "
                     f"{s['seconds']:.3f} s per step in {what[s['what']]}, median {s['median_seconds']:.3f} s ({by})")
    return lines


def _gather_hosts() -> list[str]:
    if not dist.is_initialized():
        return [socket.gethostname()]
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts


def _all_gather_rows(mine: torch.Tensor) -> list[list[float]]:
    if not dist.is_initialized():
        return [mine.tolist()]
    from pretrain.compat import device

    mine = mine.to(device())
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.cpu().tolist() for t in out]


class Watchdog:
    """A daemon thread: dumps this rank's stacks when the current step runs far longer than recent ones."""

    def __init__(self, log_dir: str, rank: int, tracker: CollectiveTracker, factor: float, min_seconds: float,
                 poll_s: float = 0.5):
        self.log_dir, self.rank, self.tracker = log_dir, rank, tracker
        self.factor, self.min_seconds, self.poll_s = factor, min_seconds, poll_s
        self.recent = collections.deque(maxlen=20)
        self.step, self.started, self.dumped = None, None, None
        self.dumps: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        os.makedirs(self.log_dir, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def step_started(self, step: int) -> None:
        self.step, self.started = step, time.time()

    def step_finished(self) -> None:
        if self.started is not None:
            self.recent.append(time.time() - self.started)
        self.started = None

    def limit(self) -> float:
        """Seconds a step may take before it counts as stalled: factor x the recent median (before 3 steps have
        finished, factor x the floor, so the first steps' warm-up and compilation are not stalls)."""
        if len(self.recent) < 3:
            return self.factor * self.min_seconds
        return max(self.min_seconds, self.factor * statistics.median(self.recent))

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            started, step = self.started, self.step
            if started is None or self.dumped == step:
                continue
            elapsed = time.time() - started
            if elapsed > self.limit():
                self.dumped = step
                self.dumps.append(self.dump(step, elapsed))

    def dump(self, step: int, elapsed: float) -> str:
        path = os.path.join(self.log_dir, f"stall-rank{self.rank}-step{step}.txt")
        median = statistics.median(self.recent) if self.recent else float("nan")
        with open(path, "w") as f:
            f.write(f"rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}): step {step} has run "
                    f"{elapsed:.1f} s; recent median {median:.2f} s; limit {self.limit():.1f} s\n"
                    f"collective in progress: {self.tracker.in_progress()}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        _dump_nccl_flight_recorder(os.path.join(self.log_dir, f"nccl-trace-rank{self.rank}-step{step}.bin"))
        print(f"[rank {self.rank}] watchdog: step {step} has run {elapsed:.1f} s (limit {self.limit():.1f} s); "
              f"stacks written to {path}", flush=True)
        return path


def _dump_nccl_flight_recorder(path: str) -> None:
    """torch's NCCL flight recorder (the last collectives of every communicator, with their state) into `path`,
    on GPU and when it records (TORCH_NCCL_TRACE_BUFFER_SIZE > 0); read it with torch's fr_trace tool."""
    if not torch.cuda.is_available() or int(os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE", "0")) <= 0:
        return
    try:
        trace = torch._C._distributed_c10d._dump_nccl_trace()
    except (AttributeError, RuntimeError):
        return
    with open(path, "wb") as f:
        f.write(trace)
