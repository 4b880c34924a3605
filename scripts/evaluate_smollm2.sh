#!/usr/bin/env bash
# The README's SmolLM2 evaluation on the test split, with the settings of configs/eval-smollm2.yaml (CONFIG): each
# task type's samples in SHARDS disjoint shards, one `polykv-learn evaluate --config CONFIG` process per shard
# (bounded memory), JOBS at a time with one torch thread each, the config's task types in its order (longest
# first), then one merged report. Re-running the script skips finished shards and resumes stopped ones from the
# samples they finished (--resume: each shard's folder keeps its own samples.jsonl). Usage (in the venv):
#   bash scripts/evaluate_smollm2.sh                      # every test sample of the six task types
#   LIMIT=8 JOBS=2 bash scripts/evaluate_smollm2.sh       # at most 8 samples per task type
# Env: CONFIG (default configs/eval-smollm2.yaml), OUT (per-shard runs, default out/eval), RESULTS (merged report,
# default results/smollm2), SHARDS (default 2); QUERY_AWARE (true/false) and CHAT (true/false) override the config's
# protocol and prompt; KVZIP_SCOPE (full/chunk) how KVzip's pass scores (--kvzip_scope); ROUTER, DATA, METHODS
# override the config's router, data and methods (e.g. METHODS="polykv polykv-static" to re-evaluate a retrained
# router, then combine with an earlier run: polykv-learn evaluate --merge EARLIER NEW --replace --out DIR).
set -euo pipefail
trap 'trap - TERM; kill 0' INT TERM  # stopping the script stops every task process (xargs would start the next)
OUT=${OUT:-out/eval}
RESULTS=${RESULTS:-results/smollm2}
JOBS=${JOBS:-2}
SHARDS=${SHARDS:-2}
CONFIG=${CONFIG:-configs/eval-smollm2.yaml}
# the config's task types (after its checks: a bad config stops the script here), one process per task and shard
TASKS=$(polykv-learn evaluate --config "$CONFIG" --print_config \
  | python -c 'import sys, yaml; print(" ".join(yaml.safe_load(sys.stdin)["tasks"] or []))')
[ -n "$TASKS" ] || { echo "$CONFIG names no tasks (tasks: [...])"; exit 2; }
mkdir -p "$OUT"
export CONFIG OUT ROUTER DATA LIMIT SHARDS METHODS QUERY_AWARE CHAT KVZIP_SCOPE
run_unit() {  # one shard of one task: "task shard"
  local task=$1 shard=$2 extra=() methods=() dir="$OUT/$1.$2-of-$SHARDS"
  [ -n "${DATA:-}" ] && extra+=(--data "$DATA")
  [ -n "${ROUTER:-}" ] && extra+=(--router "$ROUTER")
  [ -n "${LIMIT:-}" ] && extra+=(--limit "$LIMIT")
  [ -n "${QUERY_AWARE:-}" ] && extra+=(--query_aware "$QUERY_AWARE")
  [ -n "${CHAT:-}" ] && extra+=(--chat "$CHAT")
  [ -n "${KVZIP_SCOPE:-}" ] && extra+=(--kvzip_scope "$KVZIP_SCOPE")
  [ -n "${METHODS:-}" ] && { read -r -a methods <<< "$METHODS"; extra+=(--methods "${methods[@]}"); }
  if [ -f "$dir/results.json" ]; then echo "$task $shard/$SHARDS: done before, skipped"; return 0; fi
  local start=$SECONDS
  polykv-learn evaluate --config "$CONFIG" "${extra[@]}" --threads 1 --no-progress \
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
