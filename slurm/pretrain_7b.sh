#!/usr/bin/env bash
# Pretrain the 7b preset (Llama-2 shape): same as pretrain_1b.sh, other settings.
#   SAVE_DIR=/scratch/ckpt/7b DATA_PATH=/data/tokens sbatch slurm/pretrain_7b.sh
#SBATCH --job-name=pretrain-7b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
MODEL=${MODEL:-7b}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-2}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-1024}
TRAIN_ITERS=${TRAIN_ITERS:-250000}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
RECOMPUTE=${RECOMPUTE:-selective}
source "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
run_training "$@"
