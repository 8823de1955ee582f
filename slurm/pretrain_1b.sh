#!/usr/bin/env bash
# Pretrain the 1b preset (TinyLlama shape). Submit from the repo root:
#   SAVE_DIR=/scratch/ckpt/1b DATA_PATH=/data/tokens sbatch slurm/pretrain_1b.sh [extra pretrain/main.py flags]
# Resubmitting (or a requeue) resumes from SAVE_DIR. Without GPUs it runs on CPU/gloo (CPU_PROCS_PER_NODE ranks).
#SBATCH --job-name=pretrain-1b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
MODEL=${MODEL:-1b}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-512}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
RECOMPUTE=${RECOMPUTE:-selective}
source "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
run_training "$@"
