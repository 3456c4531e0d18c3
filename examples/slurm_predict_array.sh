#!/bin/bash
# Predict a whole archive across nodes with a SLURM array job (docs/batch-jobs.md).
#
# Task K of an array of N runs, on every N-th input (interleaved; a video stays whole),
#   predict.py MODEL_DIR INPUT... --shard K/N -o OUT_DIR/part_00K_of_00N.csv
# and the merge step joins the N parts into OUT_DIR/predictions.csv (one header), refusing
# when a part is missing (its task failed) or comes from another run:
#
#   jobid=$(sbatch --parsable --array=1-16 examples/slurm_predict_array.sh \
#           models/symbols predictions 'archive/**/*.mp4')
#   sbatch --dependency=afterany:$jobid --wrap \
#           "examples/slurm_predict_array.sh --merge predictions 16"
#
# or, once every task has ended, on the login node: examples/slurm_predict_array.sh --merge predictions 16
# (afterany, not afterok: a task that exits 3 for an unreadable input has written its part,
# with an `error` row for that input.)
#
# --array must be given to sbatch as 1-N (a %limit is fine, a :step is not): K is
# $SLURM_ARRAY_TASK_ID and N is $SLURM_ARRAY_TASK_COUNT. A task whose part has no inputs
# (more tasks than inputs) writes a part with only the header and succeeds. To run some
# parts again, give N as PARTS: PARTS=16 sbatch --array=3,7 examples/slurm_predict_array.sh ...
# Environment: PYTHON (default .venv/bin/python), PREDICT_FLAGS (more predict.py flags, e.g.
# "--fps 2 --batch-size 128"), SEGMENTS=1 (also write OUT_DIR/segments_K_of_N.csv, merged
# into OUT_DIR/segments.csv).
#SBATCH --job-name=predict
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --output=predict-%A_%a.log
set -euo pipefail

merge() {  # merge OUT_DIR N NAME TARGET: NAME_001_of_N.csv ... NAME_N_of_N.csv -> TARGET
    local out=$1 n=$2 name=$3 target=$4 k missing=() parts=()
    for ((k = 1; k <= n; k++)); do
        local part
        part=$(printf '%s/%s_%03d_of_%03d.csv' "$out" "$name" "$k" "$n")
        if [ -f "$part" ]; then parts+=("$part"); else missing+=("$part"); fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "ERROR: ${#missing[@]} of $n parts are missing, e.g. ${missing[0]}; run those" \
             "array tasks again (PARTS=$n sbatch --array=K,... $0 ...), then merge." >&2
        return 1
    fi
    for part in "${parts[@]}"; do
        if [ "$(head -n 1 "$part")" != "$(head -n 1 "${parts[0]}")" ]; then
            echo "ERROR: $part has another header than ${parts[0]}: not parts of one run." >&2
            return 1
        fi
    done
    # Every part has the header: keep the first file's, skip the others'.
    awk 'FNR==1 && NR!=1 {next} {print}' "${parts[@]}" > "$target.partial"
    mv "$target.partial" "$target"
    echo "$target: $(($(wc -l < "$target") - 1)) rows from $n parts" >&2
}

if [ "${1:-}" = "--merge" ]; then
    out=${2:?usage: $0 --merge OUT_DIR N}
    n=${3:?usage: $0 --merge OUT_DIR N}
    merge "$out" "$n" part "$out/predictions.csv"
    if compgen -G "$out/segments_*_of_$(printf %03d "$n").csv" > /dev/null; then
        merge "$out" "$n" segments "$out/segments.csv"
    fi
    exit 0
fi

model=${1:?usage: sbatch --array=1-N $0 MODEL_DIR OUT_DIR INPUT...}
out=${2:?usage: sbatch --array=1-N $0 MODEL_DIR OUT_DIR INPUT...}
shift 2
[ $# -gt 0 ] || { echo "usage: sbatch --array=1-N $0 MODEL_DIR OUT_DIR INPUT..." >&2; exit 2; }
k=${SLURM_ARRAY_TASK_ID:?not an array task: submit with sbatch --array=1-N}
n=${PARTS:-${SLURM_ARRAY_TASK_COUNT:?not an array task: submit with sbatch --array=1-N}}
mkdir -p "$out"
name=$(printf '%03d_of_%03d' "$k" "$n")
extra=()
if [ -n "${SEGMENTS:-}" ]; then extra+=(--segments "$out/segments_$name.csv"); fi
# shellcheck disable=SC2086  # PREDICT_FLAGS is a list of flags
exec "${PYTHON:-.venv/bin/python}" predict.py "$model" "$@" --shard "$k/$n" \
    -o "$out/part_$name.csv" ${extra[@]+"${extra[@]}"} ${PREDICT_FLAGS:-}
