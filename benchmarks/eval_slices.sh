#!/bin/sh
# The slices of MMLU, GSM8K and HumanEval that benchmarks/EVAL_RESULTS.md reports for Gemma 3 270M
# (the default model), one niced process at a time, one torch thread. A finished result file is
# kept (delete it to run that task again); an interrupted one resumes from its
# <output>.partial.jsonl: run this script again to go on.
#   OUT=/tmp/evalruns/slices nohup sh benchmarks/eval_slices.sh > /tmp/evalruns/slices.log 2>&1 &
set -e
OUT=${OUT:-/tmp/evalruns/slices}
mkdir -p "$OUT"
run() {
  out=$1; shift
  [ -f "$out" ] && { echo "== $out exists"; return; }
  echo "== $(date -u +%FT%TZ) gemmakit eval --threads 1 $* --output $out"
  nice -n 10 gemmakit eval --threads 1 "$@" --output "$out"
}
run "$OUT/humaneval_all164.json" --task humaneval --max-new-tokens 128
run "$OUT/gsm8k_first32.json" --task gsm8k --limit 32
run "$OUT/mmlu_10_per_subject.json" --task mmlu --per-subject 10
echo "== $(date -u +%FT%TZ) done"
