#!/usr/bin/env bash
# The second example, after launch/quickstart.sh: fine-tune the quickstart's checkpoint on instructions (answer-only
# loss, --objective sft), then chat with the export through transformers alone. No download: the instruction set is
# built from this Python's own sources ("write the docstring of this function" -> its docstring; held-out files
# never trained on). Prints the answer loss on the held-out pairs before and after, and samples.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
PY=.venv/bin/python
QUICK=${QUICKSTART_DIR:-runs/quickstart}
WORK=${FINETUNE_DIR:-runs/finetune}
STEPS=${FINETUNE_STEPS:-200}
if [ ! -f "$QUICK/checkpoints/latest" ]; then
  echo "error: no checkpoint in $QUICK/checkpoints; run \`bash launch/quickstart.sh\` first (QUICKSTART_DIR=$QUICK)" >&2
  exit 2
fi
FILTER="^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|UserWarning|warnings.warn|return func|FutureWarning|^$|--sample-tokens"
mkdir -p "$WORK"

echo "== 1/5 instructions: docstring pairs from this Python's standard library"
$PY launch/docstring_pairs.py --output "$WORK/pairs"

echo "== 2/5 data: rendered with the quickstart tokenizer's ChatML template; loss mask on the answers"
# The template's special tokens are in the quickstart's tokenizer (train-tokenizer --chat-template chatml), so the
# model's embedding is not resized; prepare refuses a tokenizer without them, naming the fix.
for split in train valid; do
  rm -rf "$WORK/data-$split"
  $PY -m data_prep prepare --input "$WORK/pairs/$split.jsonl" --format instruction --tokenizer "$QUICK/tokenizer" \
      --output "$WORK/data-$split" --workers 2 --max-tokens 129 --too-long truncate --progress log 2>&1 \
    | grep -v -E "WARNING (dropped|truncated)"
done

PRECISION=()
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || PRECISION=(--fp32)
COMMON=(--deepspeed_config ds_configs/zero3.json "${PRECISION[@]}" --objective sft
        --init-from-checkpoint "$QUICK/checkpoints" --data-path "$WORK/data-train"
        --valid-data-path "$WORK/data-valid" --seq-length 128 --micro-batch-size 8 --global-batch-size 16
        --eval-iters 6 --num-workers 1)
PROMPT=$'Write the docstring of this Python function.\n\ndef getcwd():'

echo "== 3/5 before: the quickstart model's answer loss on the held-out pairs (iteration 0, no step)"
rm -rf "$WORK/before"
.venv/bin/deepspeed --num_gpus 2 pretrain/main.py "${COMMON[@]}" --train-iters 0 --log-dir "$WORK/before" 2>&1 \
  | grep -v -E "$FILTER" | grep -E "val loss|initialised|error"

echo "== 4/5 fine-tune: $STEPS steps, DeepSpeed ZeRO-3, 2 processes, answer-only loss over the global batch"
rm -rf "$WORK/checkpoints" "$WORK/logs"
.venv/bin/deepspeed --num_gpus 2 pretrain/main.py "${COMMON[@]}" --train-iters "$STEPS" --lr 1e-3 --min-lr 1e-4 \
    --warmup-iters 10 --lr-decay-style cosine --eval-interval 100 --log-interval 20 --save "$WORK/checkpoints" \
    --save-interval 100 --log-dir "$WORK/logs" --sample-prompt "$PROMPT" --sample-tokens 40 2>&1 \
  | grep -v -E "$FILTER"

echo "== 5/5 export, then chat with transformers alone (apply_chat_template + generate)"
$PY -m pretrain.export --load "$WORK/checkpoints" --output "$WORK/hf" --dtype float32
$PY - "$WORK" <<'EOF' 2>&1 | grep -v -E "Warning|warn"
import json, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

logging.disable_progress_bar()
work = sys.argv[1]
val = {d: [json.loads(line)["val_loss"] for line in open(f"{work}/{d}/metrics.jsonl") if "val_loss" in line][-1]
       for d in ("before", "logs")}
print(f"answer loss on the held-out pairs: {val['before']:.4f} before -> {val['logs']:.4f} after fine-tuning")
tok = AutoTokenizer.from_pretrained(f"{work}/hf")
model = AutoModelForCausalLM.from_pretrained(f"{work}/hf", dtype=torch.float32).eval()
for line in open(f"{work}/pairs/valid.jsonl").readlines()[:3]:
    pair = json.loads(line)
    messages = [{"role": "user", "content": f"{pair['instruction']}\n\n{pair['input']}"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"{pair['input']}\n  reference: {pair['output']!r}\n  model:     {answer!r}")
EOF
