#!/usr/bin/env bash
# The real runs of docs/training.md ("GRPO and DPO of the real Gemma 3 270M on 2-digit addition"),
# one after another, each timed. MODEL defaults to the Hugging Face float32 export of the 270M.
#   bash docs/addition_runs.sh [runs/addition]     (stages: data grpo dpo gsm8k; STAGES="grpo" for one)
set -euo pipefail
OUT=${1:-runs/addition}
MODEL=${MODEL:-/work/peers/gemma3-270m-hf}
STAGES=${STAGES:-data grpo dpo}
GSM8K_LIMIT=${GSM8K_LIMIT:-100}
TOK=(${TOKENIZER:+--tokenizer "$TOKENIZER"})  # for a model without one (a random one, to try this)
mkdir -p "$OUT"
timed() {  # name, command...: runs it, appends "name seconds" to $OUT/times.txt
    local name=$1; shift; local start=$SECONDS
    echo "== $name: $*" >&2
    "$@"
    echo "$name $((SECONDS - start)) s" | tee -a "$OUT/times.txt" >&2
}
for stage in $STAGES; do case $stage in
data) timed data python docs/make_addition_data.py --out "$OUT/data" --model "$MODEL" "${TOK[@]}" --train 320 --heldout 100 ;;
grpo) rm -rf "$OUT/grpo"
      timed grpo gemmakit rl --model "$MODEL" "${TOK[@]}" --prompts "$OUT/data/train.jsonl" --eval-prompts "$OUT/data/heldout.jsonl" \
          --reward "$OUT/data/rewards.py:exact" --out "$OUT/grpo" --steps ${GRPO_STEPS:-30} --batch-prompts 8 --samples 8 \
          --max-new-tokens 4 --stop $'\n' --temperature 1.0 --beta 0.04 --lora-rank 16 --lr ${GRPO_LR:-1e-4} \
          --eval-every 10 --bf16 --no-progress ;;
dpo)  rm -rf "$OUT/dpo"
      timed dpo gemmakit dpo --model "$MODEL" "${TOK[@]}" --data "$OUT/data/pairs-train.jsonl" --eval-data "$OUT/data/pairs-heldout.jsonl" \
          --out "$OUT/dpo" --lora-rank 16 --bf16 --batch-size 8 --epochs ${DPO_EPOCHS:-2} --eval-every 10 --no-progress
      timed dpo-accuracy python docs/addition_accuracy.py "$OUT/dpo" "$OUT/data/heldout.jsonl" "${TOK[@]}" | tee "$OUT/dpo-accuracy.json" ;;
gsm8k) for m in "$MODEL" "$OUT/grpo" "$OUT/dpo"; do
          timed "gsm8k$GSM8K_LIMIT-$(basename "$m")" gemmakit eval --model "$m" "${TOK[@]}" --task gsm8k --limit "$GSM8K_LIMIT" --batch-size 16 \
              --output "$OUT/gsm8k$GSM8K_LIMIT-$(basename "$m").json"
       done ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac; done
