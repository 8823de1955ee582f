"""Distributed environment for one node of a Slurm job, as shell exports: `eval "$(python -m launch.slurm_env)"`.

MASTER_ADDR is the first host of SLURM_JOB_NODELIST, MASTER_PORT is derived from the job id (so two jobs
sharing a node do not collide, and every node computes the same port without talking), NODE_RANK is
SLURM_NODEID, and PROCS_PER_NODE is the GPU count, or CPU_PROCS_PER_NODE (default 1) without GPUs, in which case
training falls back to gloo. `--hostfile PATH` also writes a DeepSpeed hostfile ("host slots=N" per node).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> hosts: "gpu[01-03,07],login5" -> gpu01 gpu02 gpu03 gpu07 login5.
    (`scontrol show hostnames` does the same where scontrol exists; this works anywhere and is tested.)"""
    hosts, i, n = [], 0, len(nodelist)
    while i < n:
        j, depth = i, 0
        while j < n and (depth or nodelist[j] != ","):
            depth += {"[": 1, "]": -1}.get(nodelist[j], 0)
            j += 1
        hosts += _expand_one(nodelist[i:j])
        i = j + 1
    return hosts


def _expand_one(item: str) -> list[str]:
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
    if not m:
        return [item] if item else []
    prefix, ranges, rest = m.groups()
    out = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out += [f"{prefix}{k:0{len(lo)}d}" for k in range(int(lo), int(hi) + 1)]
        else:
            out.append(prefix + part)
    return [h for o in out for h in _expand_one(o + rest)]


def master_port(job_id: int, base: int = 20000, span: int = 20000) -> int:
    return base + job_id % span


def gpus_on_node() -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = os.environ.get(key, "")
        if value:
            digits = re.findall(r"\d+", value.split(":")[-1])
            if digits and os.path.exists("/dev/nvidia0"):
                return int(digits[-1])
    if shutil.which("nvidia-smi"):
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if res.returncode == 0:
            return sum(1 for line in res.stdout.splitlines() if line.startswith("GPU "))
    return 0


def environment(env=os.environ) -> dict[str, str]:
    if "SLURM_JOB_NODELIST" not in env:
        raise SystemExit("launch.slurm_env: SLURM_JOB_NODELIST is not set; run this inside a Slurm job")
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    gpus = gpus_on_node()
    procs = gpus or int(env.get("CPU_PROCS_PER_NODE", "1"))
    out = {
        "MASTER_ADDR": env.get("MASTER_ADDR") or hosts[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(int(env.get("SLURM_JOB_ID", "0")))),
        "NNODES": str(len(hosts)),
        "NODE_RANK": env.get("SLURM_NODEID", "0"),
        "PROCS_PER_NODE": str(procs),
        "WORLD_SIZE": str(procs * len(hosts)),
        "ACCELERATOR": "cuda" if gpus else "cpu",
    }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.slurm_env", description=__doc__)
    p.add_argument("--hostfile", help="also write a DeepSpeed hostfile here")
    a = p.parse_args(argv)
    env = environment()
    if a.hostfile:
        with open(a.hostfile, "w") as f:
            for host in expand_nodelist(os.environ["SLURM_JOB_NODELIST"]):
                f.write(f"{host} slots={env['PROCS_PER_NODE']}\n")
    for k, v in env.items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
