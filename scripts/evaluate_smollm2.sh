#!/usr/bin/env bash
# The README's SmolLM2 evaluation on the test split: each task type's samples in SHARDS disjoint shards, one
# `polykv-learn evaluate` process per shard (bounded memory), JOBS at a time with one torch thread each, longest task
# types first, then one merged report. Re-running the script skips finished shards and resumes stopped ones from the
# samples they finished (--resume: each shard's folder keeps its own samples.jsonl). Usage (in the venv):
#   bash scripts/evaluate_smollm2.sh                      # every test sample of the six task types
#   LIMIT=8 JOBS=2 bash scripts/evaluate_smollm2.sh       # at most 8 samples per task type
# Env: OUT (per-shard runs, default out/eval), RESULTS (merged report, default results/smollm2), ROUTER (artifact,
# default the bundled checkpoints/smollm2-135m), DATA (default data/polykv/tasks/test.jsonl), SHARDS (default 2),
# METHODS (default all; e.g. "polykv polykv-static" to re-evaluate a retrained router, then combine with an earlier
# run: polykv-learn evaluate --merge EARLIER NEW --replace --out DIR).
set -euo pipefail
trap 'trap - TERM; kill 0' INT TERM  # stopping the script stops every task process (xargs would start the next)
OUT=${OUT:-out/eval}
RESULTS=${RESULTS:-results/smollm2}
JOBS=${JOBS:-2}
SHARDS=${SHARDS:-2}
ROUTER=${ROUTER:-checkpoints/smollm2-135m}
DATA=${DATA:-data/polykv/tasks/test.jsonl}
# the six task types on which the full-cache SmolLM2 scores meaningfully (README), longest samples first
TASKS="summarisation code_completion multi_key_needle multi_query_needle few_shot_classification passkey"
mkdir -p "$OUT"
export OUT ROUTER DATA LIMIT SHARDS METHODS
run_unit() {  # one shard of one task: "task shard"
  local task=$1 shard=$2 limit=() methods=() dir="$OUT/$1.$2-of-$SHARDS"
  [ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")
  [ -n "${METHODS:-}" ] && read -r -a methods <<< "--methods $METHODS"
  if [ -f "$dir/results.json" ]; then echo "$task $shard/$SHARDS: done before, skipped"; return 0; fi
  local start=$SECONDS
  polykv-learn evaluate --data "$DATA" --router "$ROUTER" --no-chat --threads 1 --no-progress "${limit[@]}" "${methods[@]}" \
    --tasks "$task" --shard "$shard/$SHARDS" --out "$dir" --resume >> "$dir.log" 2>&1 || { echo "$task $shard: FAILED, see $dir.log"; return 1; }
  echo "$task $shard/$SHARDS: $((SECONDS - start)) s"
}
export -f run_unit
units=() dirs=()
for task in $TASKS; do
  for ((shard = 0; shard < SHARDS; shard++)); do units+=("$task $shard"); dirs+=("$OUT/$task.$shard-of-$SHARDS"); done
done
start=$SECONDS
# in the background + wait: bash runs a trap only once a foreground command ends, so a TERM sent while xargs ran
# in the foreground waited for every remaining unit (measured: the processes lived on after `kill`)
printf '%s\n' "${units[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_unit {}' &
wait $!
echo "all tasks: $((SECONDS - start)) s wall"
polykv-learn evaluate --merge "${dirs[@]}" --out "$RESULTS"
