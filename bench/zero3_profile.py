"""ZeRO-3 against ZeRO-1 on the same model and data: step time side by side, and where a ZeRO-3 step goes.

Why: every script defaults to ds_configs/zero3.json, and on this 2-core CPU it ran 2.3-2.5x slower than a plain
ZeRO-1 (issue 32). This runs the shipped ds_configs/zero3.json and ds_configs/zero1.json (both with --fp32, as
CPU runs train) as paired runs, alternating so that both see the same machine load, each run its own torchrun
job of 2 ranks (DP 2), and prints

  - the median step time (steps 3.. of each run, then the median over runs) of each config with the spread over
    the runs, and the ZeRO-3 / ZeRO-1 ratio (issue 32's bar: <= 1.25);
  - a split of each step into parts, timed on the main thread of rank 0 with exclusive timers around DeepSpeed's
    and torch.distributed's functions (nothing double-counted; what is left is compute and autograd):
      zero3 hooks    DeepSpeed's pre/post forward/backward sub-module functions (fetch bookkeeping, trace,
                     release), without the collectives they wait for
      all-gather     parameters gathered (ZeRO-3's fetches, ZeRO-1's updated partitions, ZeRO-3's persistent
                     parameters after the step): the call, and the wait of an asynchronous one
      grad reduce    gradients into buckets and reduced (ZeRO-3's reduce-scatter, ZeRO-1's all-reduce)
      optimizer      the optimizer step (Adam, clipping, partition copies), without its collectives
      other comm     the step's small all-reduces (loss, gradient norm, overflow)
      compute        the rest of the step: forward and backward kernels, autograd, Python
  - checks: losses of every step equal between the two (1e-5), ZeRO-3's parameters partitioned
    (pretrain.engine.zero3_partitioning) and released between steps, and each rank's parameter and optimizer
    elements.

  python bench/zero3_profile.py [--layers 8 16] [--pairs 3] [--steps 10] [--json out.jsonl]

Model: the tiny preset at 8 (and 16) layers, hidden 128, ffn 352, seq 128, micro-batch 2, global batch 8
(2 micro-batches per rank per step). The timers add a few percent to both configs alike; the step time itself is
measured the same way as tests/workers/train_layout.py (wall clock around pretrain.step.train_step).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "workers"))

CONFIGS = {"zero3": "ds_configs/zero3.json", "zero1": "ds_configs/zero1.json"}
SHAPE = {"hidden_size": 128, "ffn_hidden_size": 352, "seq_length": 128}
PARTS = ("compute", "zero3 hooks", "all-gather", "grad reduce", "optimizer", "other comm")


# ------------------------------------------------------------------------------------------------ worker
class Parts:
    """Exclusive wall-clock time per part on this thread: a timed function called inside another timed function
    is charged to its own part and subtracted from the caller's."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.detail = collections.defaultdict(float)  # the same by function (--detail)
        self.calls = collections.Counter()
        self.stack: list[list] = []  # [part, start, time of timed callees]
        self.work_part: dict[int, str] = {}  # asynchronous collective's Work -> its part

    def wrap(self, fn, part):
        if getattr(fn, "_parts", False):
            return fn

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append([part, time.perf_counter(), 0.0])
            try:
                out = fn(*args, **kwargs)
                if kwargs.get("async_op") and out is not None:
                    self.work_part[id(out)] = part
                return out
            finally:
                name, t0, inner = self.stack.pop()
                spent = time.perf_counter() - t0
                self.seconds[name] += spent - inner
                self.detail[f"{name}: {fn.__qualname__}"] += spent - inner
                self.calls[f"{name}: {fn.__qualname__}"] += 1
                if self.stack:
                    self.stack[-1][2] += spent

        timed._parts = True
        return timed

    def wrap_wait(self, fn):
        @functools.wraps(fn)
        def timed_wait(work, *args, **kwargs):
            # an asynchronous collective's wait goes to its part; a synchronous one waits inside its own call
            part = self.work_part.pop(id(work), None) or (self.stack[-1][0] if self.stack else "other comm")
            return self.wrap(fn, part)(work, *args, **kwargs)

        return timed_wait

    def install(self, engine) -> None:
        import torch
        import torch.distributed as dist
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero import stage3, stage_1_and_2
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

        for name, part in (("all_gather_into_tensor", "all-gather"), ("all_gather", "all-gather"),
                           ("reduce_scatter_tensor", "grad reduce"), ("reduce_scatter", "grad reduce"),
                           ("all_reduce", "other comm"), ("broadcast", "other comm")):
            setattr(dist, name, self.wrap(getattr(dist, name), part))
        # DeepSpeed's backend keeps its own references to torch's all-gather and reduce-scatter (taken at init)
        import deepspeed.comm.comm as ds_comm

        backend = ds_comm.cdb
        backend.all_gather_function = self.wrap(backend.all_gather_function, "all-gather")
        backend.reduce_scatter_function = self.wrap(backend.reduce_scatter_function, "grad reduce")
        work = torch._C._distributed_c10d.Work
        work.wait = self.wrap_wait(work.wait)
        for name in ("pre_sub_module_forward_function", "post_sub_module_forward_function",
                     "pre_sub_module_backward_function", "post_sub_module_backward_function"):
            setattr(DeepSpeedZeRoOffload, name, self.wrap(getattr(DeepSpeedZeRoOffload, name), "zero3 hooks"))
        # gradient reduction: ZeRO-3's per-parameter hook (bucket copy, reduce-scatter at a flush) and its
        # end-of-backward flush; ZeRO-1's reduction at the accumulation boundary
        z3 = stage3.DeepSpeedZeroOptimizer_Stage3
        for name in ("reduce_ready_partitions_and_remove_grads", "overlapping_partition_gradients_reduce_epilogue"):
            setattr(z3, name, self.wrap(getattr(z3, name), "grad reduce"))
        z1 = stage_1_and_2.DeepSpeedZeroOptimizer
        z1.reduce_gradients = self.wrap(z1.reduce_gradients, "grad reduce")
        DeepSpeedEngine.allreduce_gradients = self.wrap(DeepSpeedEngine.allreduce_gradients, "grad reduce")
        for cls in (z3, z1):
            cls.step = self.wrap(cls.step, "optimizer")
        # pretrain/zero3_step.py puts its own reduce hook and epilogue on the optimizer instance, and reduces the
        # step's gradients in flush()
        for name in ("reduce_ready_partitions_and_remove_grads", "independent_gradient_partition_epilogue"):
            if name in vars(engine.optimizer):
                setattr(engine.optimizer, name, self.wrap(getattr(engine.optimizer, name), "grad reduce"))
        if getattr(engine, "zero3_step", None):
            engine.zero3_step.flush = self.wrap(engine.zero3_step.flush, "grad reduce")

    def take(self) -> tuple[dict, dict]:
        out = dict(self.seconds), {k: [v, self.calls[k]] for k, v in self.detail.items()}
        self.seconds, self.detail, self.calls = (collections.defaultdict(float), collections.defaultdict(float),
                                                 collections.Counter())
        return out


def partitioned_and_released(engine) -> dict:
    """Between steps: every partitioned ZeRO-3 parameter holds only its partition (none left gathered)."""
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_status")]
    gathered = [p.ds_id for p in params if not p.ds_persist and p.ds_status.name != "NOT_AVAILABLE"]
    return {"left_gathered": len(gathered)}


def rank_elements(engine) -> dict:
    """This rank's parameter elements (ZeRO-3: its partitions) and optimizer-state elements (Adam's and the fp32
    master copy DeepSpeed keeps)."""
    import torch

    params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    state = sum(t.numel() for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"param_elements": params, "optimizer_state_elements": state}


def worker(a) -> int:
    import train_layout as tl  # tests/workers/train_layout.py: the model, batches and engine of the tests

    sys.argv = ["train_layout", "--ds-config", a.ds_config, "--micro-batch-size", "2", "--global-batch-size", "8",
                "--cfg", *(f"{k}={v}" for k, v in {**SHAPE, "num_layers": a.layers}.items()), "--out", a.out]
    cfg, layout, engine = tl.build(tl.parse())
    import torch
    from megatron.core import parallel_state as ps

    from pretrain.engine import zero3_partitioning
    from pretrain.step import train_step

    parts = Parts()
    parts.install(engine)
    dp_rank, rep = ps.get_data_parallel_rank(), {"losses": {}, "step_s": {}, "parts": {}, "released": {}}
    for step in range(1, a.steps + 1):
        parts.take()
        t0 = time.perf_counter()
        r = train_step(engine, tl.micro_batches(cfg, layout, step, dp_rank))
        rep["step_s"][step] = time.perf_counter() - t0
        rep["parts"][step], rep.setdefault("detail", {})[step] = parts.take()
        rep["losses"][step] = r.loss
        rep["released"][step] = partitioned_and_released(engine)["left_gathered"]
    rep.update(zero3_partitioning(engine), **rank_elements(engine))
    if torch.distributed.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(rep, f)
    torch.distributed.barrier()
    tl.shutdown_distributed()  # pretrain/parallel.py: gloo's threads otherwise abort the exit now and then
    return 0


# ------------------------------------------------------------------------------------------------ driver
def run(config: str, layers: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(__file__), "--worker", "--ds-config", config, "--layers", str(layers),
               "--steps", str(steps), "--out", out]
        for _ in range(3):  # --standalone's rendezvous port can collide with one in TIME_WAIT
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(cmd)} failed 3 times:\n{res.stderr[-3000:]}")
        with open(out) as f:
            r = json.load(f)
    timed = [str(s) for s in range(3, steps + 1)]  # step 1 records ZeRO-3's trace, step 2 broadcasts it
    parts = {p: statistics.median(r["parts"][s].get(p, 0.0) for s in timed) for p in PARTS[1:]}
    step = statistics.median(r["step_s"][s] for s in timed)
    parts["compute"] = statistics.median(r["step_s"][s] - sum(r["parts"][s].values()) for s in timed)
    return {**r, "median_s": step, "median_parts": parts}


def _spread(values) -> str:
    return f"{statistics.median(values) * 1e3:6.1f} ms ({min(values) * 1e3:.0f}-{max(values) * 1e3:.0f})"


def compare(layers: int, pairs: int, steps: int) -> dict:
    runs = {name: [] for name in CONFIGS}
    load = []
    for i in range(pairs):
        order = list(CONFIGS) if i % 2 == 0 else list(CONFIGS)[::-1]  # alternate who goes first
        for name in order:
            load.append(os.getloadavg()[0])
            runs[name].append(run(CONFIGS[name], layers, steps))
    z3, z1 = runs["zero3"], runs["zero1"]
    # the same batches and seed: the same losses, step for step
    for a, b in zip(z3, z1):
        for s in a["losses"]:
            assert abs(a["losses"][s] - b["losses"][s]) <= 1e-5, (s, a["losses"][s], b["losses"][s])
    for r in z3:
        assert r["partitioned"] > 0 and r["partitioned_elements"] > 0.99 * r["all_elements"], r
        assert not any(r["released"].values()), f"parameters left gathered between steps: {r['released']}"
    ratios = [a["median_s"] / b["median_s"] for a, b in zip(z3, z1)]
    print(f"\n{layers} layers, hidden {SHAPE['hidden_size']}, ffn {SHAPE['ffn_hidden_size']}, seq "
          f"{SHAPE['seq_length']}, micro-batch 2, global batch 8, DP 2, fp32; median of steps 3-{steps} per run, "
          f"{pairs} paired runs (load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores)")
    print(f"| part | {CONFIGS['zero3']} | {CONFIGS['zero1']} |\n|---|---|---|")
    print(f"| step | {_spread([r['median_s'] for r in z3])} | {_spread([r['median_s'] for r in z1])} |")
    for p in PARTS:
        print(f"| {p} | {_spread([r['median_parts'][p] for r in z3])} | "
              f"{_spread([r['median_parts'][p] for r in z1])} |")
    print(f"ZeRO-3 / ZeRO-1: {statistics.median(ratios):.2f} (paired runs: "
          + ", ".join(f"{x:.2f}" for x in ratios) + ")")
    print(f"losses equal (1e-5) over {len(z3[0]['losses'])} steps; ZeRO-3 partitioned {z3[0]['partitioned']} of "
          f"{z3[0]['zero3_params']} tensors ({z3[0]['partitioned_elements'] / z3[0]['all_elements']:.1%} of "
          f"elements), none left gathered between steps; per rank: parameters {z3[0]['param_elements']:,} "
          f"elements under ZeRO-3 against {z1[0]['param_elements']:,} under ZeRO-1, optimizer state "
          f"{z3[0]['optimizer_state_elements']:,} against {z1[0]['optimizer_state_elements']:,}")
    return {"layers": layers, "pairs": pairs, "ratio": statistics.median(ratios), "ratios": ratios,
            "load": [min(load), max(load)],
            **{f"{n}_step_s": [r["median_s"] for r in runs[n]] for n in CONFIGS},
            **{f"{n}_parts_s": {p: statistics.median(r["median_parts"][p] for r in runs[n]) for p in PARTS}
               for n in CONFIGS},
            "zero3_elements": {k: z3[0][k] for k in ("param_elements", "optimizer_state_elements")},
            "zero1_elements": {k: z1[0][k] for k in ("param_elements", "optimizer_state_elements")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", help="append one line per model to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ds-config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.layers = a.layers[0]
        return worker(a)
    for n in CONFIGS:
        CONFIGS[n] = os.environ.get(f"ZERO3_PROFILE_{n.upper()}", CONFIGS[n])  # experiments: another config
    t0 = time.time()
    rows = [compare(layers, a.pairs, a.steps) for layers in a.layers]
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "date": time.strftime("%Y-%m-%d")}) + "\n")
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
