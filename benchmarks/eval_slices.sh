#!/bin/sh
# The slices of MMLU, GSM8K and HumanEval that benchmarks/EVAL_RESULTS.md reports for Gemma 3 270M
# (the default model), one niced process at a time, one torch thread. Each command resumes from its
# <output>.partial.jsonl if it was interrupted: run this script again to go on.
#   OUT=/tmp/evalruns/slices nohup sh benchmarks/eval_slices.sh > /tmp/evalruns/slices.log 2>&1 &
set -e
OUT=${OUT:-/tmp/evalruns/slices}
mkdir -p "$OUT"
run() { echo "== $(date -u +%FT%TZ) gemmakit eval $*"; nice -n 10 gemmakit eval --threads 1 "$@"; }
run --task mmlu --per-subject 10 --output "$OUT/mmlu_10_per_subject.json"
run --task gsm8k --limit 32 --output "$OUT/gsm8k_first32.json"
run --task humaneval --limit 48 --max-new-tokens 128 --output "$OUT/humaneval_first48.json"
echo "== $(date -u +%FT%TZ) done"
