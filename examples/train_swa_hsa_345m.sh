#!/bin/bash
# SWA+HSA-345M on one node, the papers' recipe: AdamW (0.9, 0.95), wd 1e-3, peak LR 2e-3, 2% warm-up then cosine
# to 10%, bf16, 8K tokens, chunk-aligned document packing for HSA. The model is examples/swa_hsa_345m.yaml;
# any flag given here (or appended on the command line) overrides the file.
# Usage: TOKENIZER=<tokenizer.json or HF tokenizer directory of the data> \
#            bash examples/train_swa_hsa_345m.sh DATA_PREFIX CHECKPOINT_DIR [extra pretrain_hsa.py flags ...]
set -euo pipefail
DATA_PATH=${1:?data prefix from tools/preprocess_data.py}
CHECKPOINT_PATH=${2:?checkpoint directory}
shift 2
GPUS=${GPUS:-8}
TRAIN_ITERS=${TRAIN_ITERS:-50000}

torchrun --nproc-per-node "$GPUS" pretrain_hsa.py \
    --config examples/swa_hsa_345m.yaml \
    --data-path "$DATA_PATH" --split 998,1,1 --data-pack-chunk-size 64 \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "${TOKENIZER:?export TOKENIZER=<tokenizer.json or HF tokenizer directory of the data>}" \
    --micro-batch-size 2 --global-batch-size 128 --train-iters "$TRAIN_ITERS" \
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-fraction 0.02 \
    --weight-decay 1e-3 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --attention-dropout 0.0 --hidden-dropout 0.0 --bf16 --use-distributed-optimizer \
    --log-interval 10 --log-throughput --eval-interval 1000 --eval-iters 20 \
    --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 1000 --keep-last-checkpoints 3 \
    --tensorboard-dir "$CHECKPOINT_PATH/tensorboard" \
    "$@"
