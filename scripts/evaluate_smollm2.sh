#!/usr/bin/env bash
# The README's SmolLM2 evaluation on the test split: one `polykv-learn evaluate` process per task type (bounded
# memory; a finished task is skipped when the script is re-run), JOBS at a time with one torch thread each, then one
# merged report. Usage (inside the venv):
#   bash scripts/evaluate_smollm2.sh                      # every test sample of the six task types
#   LIMIT=8 JOBS=2 bash scripts/evaluate_smollm2.sh       # at most 8 samples per task type
# Env: OUT (per-task runs, default out/eval), RESULTS (merged report, default results/smollm2), ROUTER (artifact,
# default the bundled checkpoints/smollm2-135m), DATA (default data/polykv/tasks/test.jsonl).
set -euo pipefail
trap 'trap - TERM; kill 0' INT TERM  # stopping the script stops every task process (xargs would start the next)
OUT=${OUT:-out/eval}
RESULTS=${RESULTS:-results/smollm2}
JOBS=${JOBS:-2}
ROUTER=${ROUTER:-checkpoints/smollm2-135m}
DATA=${DATA:-data/polykv/tasks/test.jsonl}
# the six task types on which the full-cache SmolLM2 scores meaningfully (README), longest samples first
TASKS="summarisation code_completion multi_query_needle multi_key_needle passkey few_shot_classification"
mkdir -p "$OUT"
export OUT ROUTER DATA LIMIT
run_task() {
  local task=$1 limit=()
  [ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")
  if [ -f "$OUT/$task/results.json" ]; then echo "$task: done before, skipped"; return 0; fi
  local start=$SECONDS
  polykv-learn evaluate --data "$DATA" --router "$ROUTER" --no-chat --threads 1 --no-progress "${limit[@]}" \
    --tasks "$task" --out "$OUT/$task" > "$OUT/$task.log" 2>&1 || { echo "$task: FAILED, see $OUT/$task.log"; return 1; }
  echo "$task: $((SECONDS - start)) s"
}
export -f run_task
start=$SECONDS
printf '%s\n' $TASKS | xargs -P "$JOBS" -I{} bash -c 'run_task {}'
echo "all tasks: $((SECONDS - start)) s wall"
dirs=()
for task in $TASKS; do dirs+=("$OUT/$task"); done
polykv-learn evaluate --merge "${dirs[@]}" --out "$RESULTS"
