#!/usr/bin/env bash
# Issue 32's GPU measurement: ZeRO-3 (shipped ds_configs/zero3.json) against ZeRO-1 on the 1b preset, seq 2048,
# micro-batch 4, the same recompute, each side in a process of its own (bench/gpu_throughput.py --which ours), plus
# the same at 4 micro-batches per step (where pretrain/zero3_step.py decides per model whether to hold parameters
# and reduce once: for 1b it does not, and the run's log says why). Rows (with the date and the GPU's name) go to
# $OUT/zero3_gpu.jsonl ($OUT: the device tool's folder that comes back) or bench/zero3_gpu.jsonl.
#
# Prepared for the device tool (one H200: Python 3.12 and torch there, no DeepSpeed or megatron-core), in two steps:
#   here, once:  PYTHON=.venv/bin/python bash bench/gpu_zero3.sh --fetch-wheels   (wheels for Python 3.12 into .whl/,
#                ignored by git; the project's venv builds DeepSpeed's wheel against its torch, no build isolation)
#   there:       run(command="bash bench/gpu_zero3.sh", carry=[".whl"], timeout_s=560)
# Budget: 4 runs of 13 steps of 1b, well under the tool's 10 minutes a command on an H100-class GPU (a ZeRO-3 step
# measured 0.97 s on an H100 before issue 32, ZeRO-1 0.20 s). MODEL=tiny STEPS=2 runs the same on CPU (checked).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx /.whl/ .git/info/exclude || echo /.whl/ >> .git/info/exclude
  mkdir -p .whl
  # deepspeed publishes only an sdist: build its pure-Python wheel here (ops are JIT-built, none needed for this)
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
  # the rest as wheels for the device's Python (names from requirements.txt and deepspeed's Requires-Dist)
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    megatron-core==0.16.1 hjson msgpack ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection \
    einops
  ls -la .whl
  exit 0
fi

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-bench}/zero3_gpu.jsonl
model=${MODEL:-1b}
steps=${STEPS:-10}
warmup=$(( steps > 3 ? 3 : 1 ))
if [ "$model" = 1b ]; then seq=2048; mb=4; else seq=128; mb=2; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU: CPU run"
for gas in 1 4; do
  for zero in 3 1; do
    cfg=$([ "$zero" = 3 ] && echo ds_configs/zero3.json || echo ds_configs/zero1.json)
    echo "== ZeRO-$zero ($cfg), $model, seq $seq, micro-batch $mb x $gas"
    PYTHONUNBUFFERED=1 $PY bench/gpu_throughput.py --model "$model" --seq-length $seq --micro-batch-size $mb \
      --grad-accum $gas --ds-config "$cfg" --which ours --steps "$steps" --warmup $warmup --json "$out"
  done
done
# pretrain/zero3_step.py's path on this device (it is off for 1b): the tiny model, 4 micro-batches, with and
# without it; the losses after the same steps must agree (bf16: summation order only)
for on in 1 0; do
  echo "== tiny, ZeRO-3, 4 micro-batches, PRETRAIN_ZERO3_STEP=$on"
  PRETRAIN_ZERO3_STEP=$on PYTHONUNBUFFERED=1 $PY bench/gpu_throughput.py --model tiny --seq-length 128 \
    --micro-batch-size 2 --grad-accum 4 --ds-config ds_configs/zero3.json --which ours --steps 6 --warmup 1 \
    --json "$out.check"
done
$PY - "$out.check" <<'PY'
import json, sys
a, b = (json.loads(line)["ours"]["loss"] for line in open(sys.argv[1]).read().splitlines()[-2:])
print(f"tiny ZeRO-3 loss after 7 steps: one exchange per step {a}, DeepSpeed's path {b}: "
      + ("agree" if abs(a - b) <= 2e-3 * abs(b) else "DIFFER"))
PY
echo "rows: $out"
