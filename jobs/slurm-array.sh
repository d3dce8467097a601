#!/bin/bash
# A Slurm array: 4 tasks, each one shard of jobs/sharded.toml's INPUT.
#   sbatch jobs/slurm-array.sh                      (from the repository root)
#   sbatch --dependency=afterany:<array job id> --wrap \
#     "batchgen merge jobs/sharded-out-*-of-4.jsonl --input jobs/examples/prompts.jsonl -o merged.jsonl"
# (afterany, not afterok: a shard that exits 3 is complete; merge checks completeness itself.)
# --shard auto with --num-shards takes SLURM_ARRAY_TASK_ID as the shard number, so one task
# can be resubmitted alone (sbatch --array=2 jobs/slurm-array.sh); keep --array=0-(N-1).
# --resume makes a requeued or resubmitted task finish its shard instead of starting over.
# Exit codes: 1 (the model could not load, a node problem) is worth a retry; 2 (bad job
# file or options) and 3 (some lines got error lines) are not.
#SBATCH --job-name=batchgen
#SBATCH --array=0-3
#SBATCH --cpus-per-task=2
#SBATCH --time=02:00:00
#SBATCH --output=batchgen-%A_%a.log
#SBATCH --requeue
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
batchgen run --job jobs/sharded.toml --shard auto --num-shards 4 --resume
