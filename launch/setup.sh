#!/usr/bin/env bash
# Create .venv and install everything the project needs. Idempotent: a second run with unchanged requirements
# returns at once. torch is installed first and pinned, so nothing pulls a multi-GB CUDA build by accident
# (on a GPU cluster, `pip install torch==2.13.0` gets the CUDA build of the same version).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
[ -n "$PYTHON" ] || { echo "setup: no python3 found; install Python 3.11" >&2; exit 1; }

stamp=".venv/.installed-$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setup: installing into .venv (one time, about a minute)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools
.venv/bin/python -m pip install -q "torch==$(sed -n 's/^torch==//p' requirements.txt)"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
# DeepSpeed JIT-builds C++ ops on first use. Its shared-memory all-reduce is never loaded (pretrain/compat.py
# marks it incompatible: training does not use it); CPU Adam (offload) is built once here. A build killed earlier
# can have left its lock, on which every load waits forever: refuse that with the fix, and bound the build's time
# (launch/op_builds.py).
prebuild() {  # $1: what, $2: the builder's import
  local rc=0
  timeout "${PREBUILD_TIMEOUT:-900}" .venv/bin/python -c "from deepspeed.ops.op_builder$2 as B; B().load()" \
    >/dev/null 2>&1 || rc=$?
  if [ "$rc" = 124 ]; then
    echo "setup: prebuilding DeepSpeed's $1 op did not end in ${PREBUILD_TIMEOUT:-900} s" >&2
    .venv/bin/python -m launch.op_builds --max-age 0 || true
    exit 1
  fi
  [ "$rc" = 0 ] || echo "setup: note: could not prebuild DeepSpeed's $1 op (it will be built on first use)"
}
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  .venv/bin/python -m launch.op_builds || exit 1
  # DeepSpeedCPUAdam (ds_configs/zero3_offload.json) is JIT-built on first use too: about 90 s on 2 cores.
  prebuild "CPU Adam" " import CPUAdamBuilder"
fi
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: done"
