# Sourced by the pretrain_*.sh batch scripts: distributed/NCCL settings in one place, then one launcher per node.
# Everything here is driven by environment variables, so a script only sets defaults for its model size.

# --- NCCL / torch.distributed: the one place to tune them --------------------------------------------------
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer fails the job
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_SOCKET_NTHREADS=${NCCL_SOCKET_NTHREADS:-4}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Set NCCL_SOCKET_IFNAME / NCCL_IB_HCA here if your fabric needs them (e.g. export NCCL_SOCKET_IFNAME=ib0).

run_training() {
  set -euo pipefail
  REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
  cd "$REPO"
  PY=${PYTHON:-$REPO/.venv/bin/python}
  [ -x "$PY" ] || { echo "slurm: $PY not found: run 'bash launch/setup.sh' in $REPO first (or set PYTHON)" >&2; exit 2; }
  : "${SAVE_DIR:?set SAVE_DIR (checkpoints; the job resumes from it automatically)}"
  : "${DATA_PATH:?set DATA_PATH (a data_prep output directory, or weighted: '0.7 dirA 0.3 dirB')}"
  eval "$("$PY" -m launch.slurm_env)"
  mkdir -p "$SAVE_DIR"
  rm -f "$SAVE_DIR/requeue"
  LOG_DIR=${LOG_DIR:-$SAVE_DIR/logs}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-$PROCS_PER_NODE} / PROCS_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-$PROCS_PER_NODE} / PROCS_PER_NODE : 1 ))}
  echo "slurm: job ${SLURM_JOB_ID:-?} on $NNODES node(s) x $PROCS_PER_NODE $ACCELERATOR process(es); master $MASTER_ADDR:$MASTER_PORT"

  # shellcheck disable=SC2206
  train_args=(pretrain/main.py --deepspeed_config "${DS_CONFIG}" --model "${MODEL}" --data-path ${DATA_PATH}
              --tp "${TP}" --pp "${PP}" --micro-batch-size "${MICRO_BATCH_SIZE}" --global-batch-size "${GLOBAL_BATCH_SIZE}"
              --train-iters "${TRAIN_ITERS}" --save "$SAVE_DIR" --save-interval "${SAVE_INTERVAL}"
              --log-dir "$LOG_DIR" --recompute "${RECOMPUTE}" ${EXTRA_ARGS:-} "$@")
  # One torchrun per node, static rendezvous (no ssh, no hostname-dependent c10d rendezvous). torchrun runs with
  # SIGUSR1 ignored, so Slurm's --signal=USR1 reaches the training ranks (which install their own handler:
  # finish the step, save, exit 3) without killing their launcher.
  # scancel, preemption and the time limit signal every process of the job, this shell too (SIGTERM; SIGKILL after
  # KillWait). The ranks finish their step, save a checkpoint tagged preemption and exit 3 (pretrain/signals.py);
  # this shell must outlive srun meanwhile: bash runs a trap only once the foreground srun has returned.
  trap 'echo "slurm: job ${SLURM_JOB_ID:-?} got SIGTERM (scancel, preemption or time limit): the ranks save and exit 3"' TERM
  set +e
  srun --kill-on-bad-exit=1 --ntasks-per-node=1 --export=ALL bash -c '
    trap "" USR1
    exec "$0" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$SLURM_NODEID" \
      --nproc_per_node="$PROCS_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$@"' \
    "$PY" "${train_args[@]}"
  code=$?
  set -e
  if [ -f "$SAVE_DIR/requeue" ]; then
    rm -f "$SAVE_DIR/requeue"
    echo "slurm: checkpoint saved before preemption/time limit; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$code"
}
