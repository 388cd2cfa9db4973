#!/bin/bash
# A Megatron-LM GPT command line, unchanged apart from the script name (pretrain_gpt.py -> pretrain_hsa.py).
# Mixtral-style MoE on one 8-GPU node: TP 2 with sequence parallelism, EP 4, distributed optimizer, bf16.
# Usage: bash examples/train_gpt_megatron_style.sh DATA_PREFIX CHECKPOINT_DIR TENSORBOARD_DIR
set -euo pipefail
DATA_PATH=${1:?data prefix from tools/preprocess_data.py}
CHECKPOINT_PATH=${2:?checkpoint directory}
TENSORBOARD_LOGS_PATH=${3:?tensorboard directory}
export CUDA_DEVICE_MAX_CONNECTIONS=1

DISTRIBUTED_ARGS=(--nproc-per-node 8 --nnodes 1 --master-addr localhost --master-port 6000)
MODEL_ARGS=(
    --num-layers 24 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16
    --group-query-attention --num-query-groups 4 --seq-length 8192 --max-position-embeddings 8192
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0
)
MOE_ARGS=(
    --num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
    --moe-token-dispatcher-type alltoall --moe-grouped-gemm
)
DATA_ARGS=(--data-path "$DATA_PATH" --tokenizer-type NullTokenizer --vocab-size 32000 --split 969,30,1)
TRAINING_ARGS=(
    --micro-batch-size 1 --global-batch-size 256 --train-iters 100000
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --lr-decay-iters 100000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02 --bf16
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 1
    --expert-model-parallel-size 4 --use-distributed-optimizer
)
LOGGING_ARGS=(
    --log-interval 10 --log-throughput --save-interval 1000 --eval-interval 1000 --eval-iters 10
    --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --tensorboard-dir "$TENSORBOARD_LOGS_PATH"
)

torchrun "${DISTRIBUTED_ARGS[@]}" pretrain_hsa.py \
    "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}"
