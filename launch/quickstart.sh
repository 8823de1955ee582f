#!/usr/bin/env bash
# README command 1: the whole chain on one CPU machine, no download.
# Corpus: this Python's standard library sources (~34 MB of .py files every machine has). Trains a BPE
# tokenizer, packs shards, trains a small GPT with DeepSpeed ZeRO-3 on 2 processes, evaluates, checkpoints,
# plots the loss, exports the checkpoint to Hugging Face and samples from the export with transformers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
PY=.venv/bin/python
WORK=${QUICKSTART_DIR:-runs/quickstart}
STEPS=${QUICKSTART_STEPS:-300}
STDLIB=$($PY -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
CORPUS=(--input "$STDLIB" --text-suffix .py --include '*.py' --exclude '*/site-packages/*' --keep-indent)
# ChatML's special tokens and template go into the tokenizer now, so that launch/finetune.sh fine-tunes this
# model on conversations without resizing its embedding (the tokens exist, untrained, from the start).
TOKENIZER=(--vocab-size 4096 --chat-template chatml)
mkdir -p "$WORK"
# A tokenizer and shards made with other corpus or tokenizer options (an earlier version of this script) are
# rebuilt, not reused: prepare refuses an output directory written with different options, and the tokenizer would
# not match.
if [ "$(cat "$WORK/corpus.args" 2>/dev/null)" != "${CORPUS[*]} ${TOKENIZER[*]}" ]; then
  rm -rf "$WORK/tokenizer" "$WORK/data"
  printf '%s' "${CORPUS[*]} ${TOKENIZER[*]}" > "$WORK/corpus.args"
fi

echo "== 1/4 tokenizer: byte-level BPE, 4096 tokens (with ChatML's special tokens), on $STDLIB"
if [ ! -f "$WORK/tokenizer/tokenizer.json" ]; then
  $PY -m data_prep train-tokenizer "${CORPUS[@]}" "${TOKENIZER[@]}" --output "$WORK/tokenizer"
fi

echo "== 2/4 data: clean, dedup, tokenize, pack into Megatron .bin/.idx shards"
$PY -m data_prep prepare "${CORPUS[@]}" --tokenizer "$WORK/tokenizer" --output "$WORK/data" --workers 2 \
    --shard-size 4000000

# The default config (ZeRO-3, bf16). Without a GPU, in fp32: a CPU without bf16 instructions runs bf16 matmuls
# through a slow path (the output layer's backward took 1.28 s in bf16 against 0.03 s in fp32 on a 2-core AMD
# EPYC, 3.2 s per step in all), and a CPU run is a demonstration, not a precision study.
PRECISION=()
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || PRECISION=(--fp32)
echo "== 3/4 train: DeepSpeed ZeRO-3 (ds_configs/zero3.json${PRECISION[*]:+, fp32 on CPU}), 2 processes, $STEPS steps"
rm -rf "$WORK/checkpoints" "$WORK/logs"
.venv/bin/deepspeed --num_gpus 2 pretrain/main.py --deepspeed_config ds_configs/zero3.json "${PRECISION[@]}" \
    --data-path "$WORK/data" --model tiny --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
    --num-query-groups 2 --ffn-hidden-size 384 --seq-length 128 --micro-batch-size 8 --global-batch-size 16 \
    --train-iters "$STEPS" --lr 3e-3 --min-lr 3e-4 --warmup-iters 20 --lr-decay-style cosine \
    --eval-interval 100 --eval-iters 4 --log-interval 20 --save "$WORK/checkpoints" --save-interval 100 \
    --log-dir "$WORK/logs" --plot --sample-prompt "def main(" --sample-tokens 48 --num-workers 1 2>&1 \
  | grep -v -E "^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|UserWarning|warnings.warn|return func|FutureWarning"

echo "== 4/4 export to Hugging Face, then sample with transformers alone"
$PY -m pretrain.export --load "$WORK/checkpoints" --output "$WORK/hf" --dtype float32
$PY -m pretrain.generate --hf "$WORK/hf" --prompt "def main(" --tokens 48 2>&1 | grep -v -E "Warning|warn"
