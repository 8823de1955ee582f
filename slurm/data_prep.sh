#!/usr/bin/env bash
# Data prep on Slurm: a job array over slices of the inputs, then a merge job that runs after all succeed.
# Submit both with one command, from the repo root:
#   bash slurm/data_prep.sh submit --tasks 16 --output /data/tokens -- --input /raw/*.jsonl.zst --tokenizer tok/
# (add --wait before -- to block until the merge finished; SBATCH_EXTRA_ARGS adds sbatch options to both jobs).
# Inside the array, each task reads its rank from SLURM_ARRAY_TASK_ID/COUNT; exact dedup is made global by the merge.
#SBATCH --job-name=data-prep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
PY=${PYTHON:-$REPO/.venv/bin/python}
mode=${1:?usage: bash slurm/data_prep.sh submit --tasks N --output DIR [--wait] -- PREPARE_ARGS...}
shift
case "$mode" in
  submit)
    tasks=1 out="" wait=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
      case "$1" in
        --tasks) tasks=$2; shift 2 ;;
        --output) out=$2; shift 2 ;;
        --wait) wait=(--wait); shift ;;
        *) echo "data_prep.sh: unknown option $1" >&2; exit 2 ;;
      esac
    done
    [ "${1:-}" = "--" ] && shift
    [ -n "$out" ] || { echo "data_prep.sh: --output DIR is required" >&2; exit 2; }
    # SBATCH_EXTRA_ARGS: options for both jobs, e.g. "--account=X --partition=Y --cpus-per-task=16".
    read -r -a extra <<< "${SBATCH_EXTRA_ARGS:-}"
    array=$(sbatch --parsable "${extra[@]}" --array=0-$((tasks - 1)) "$0" rank --output "$out" "$@")
    merge=$(sbatch --parsable "${extra[@]}" "${wait[@]}" --dependency=afterok:"$array" --job-name=data-prep-merge "$0" merge --output "$out")
    echo "submitted array job $array ($tasks tasks) and merge job $merge"
    ;;
  rank)
    workers=${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}
    exec "$PY" -m data_prep prepare --workers "$workers" --progress log "$@"
    ;;
  merge)
    exec "$PY" -m data_prep merge "$@"
    ;;
  *)
    echo "data_prep.sh: mode must be submit, rank or merge" >&2; exit 2 ;;
esac
