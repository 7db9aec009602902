#!/bin/sh
# The full MMLU, GSM8K and HumanEval runs of Gemma 3 270M (the default model) that
# benchmarks/EVAL_RESULTS.md reports, one niced process at a time. A finished result file is kept
# (delete it to run that task again); an interrupted one resumes from its <output>.partial.jsonl:
# run this script again to go on.
#   OUT=/tmp/evalruns/full nohup sh benchmarks/eval_full.sh > /tmp/evalruns/full.log 2>&1 &
set -e
OUT=${OUT:-/tmp/evalruns/full}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
run() {
  out=$1; shift
  [ -f "$out" ] && { echo "== $out exists"; return; }
  echo "== $(date -u +%FT%TZ) gemmakit eval --threads $THREADS $* --output $out"
  nice -n 10 gemmakit eval --threads "$THREADS" "$@" --output "$out"
}
run "$OUT/mmlu_full.json" --task mmlu
run "$OUT/gsm8k_full_int8.json" --task gsm8k --quantize int8 --batch-size 16
run "$OUT/humaneval_all164.json" --task humaneval --max-new-tokens 128
echo "== $(date -u +%FT%TZ) done"
