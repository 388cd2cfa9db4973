"""A Megatron-LM ``pretrain_gpt.py`` command line runs unchanged under ``pretrain_hsa.py`` (2 gloo ranks).

Tensor parallel 2 with sequence parallelism, expert parallel 2 (MoE, alltoall), sequence length, micro/global batch,
warm-up + cosine LR schedule, distributed optimizer, ``--save/--load``, ``--tensorboard-dir``: flags exactly as in
Megatron-LM's examples, only the script name differs. TensorBoard gets megatron's scalar names plus ours.
"""

import glob
import os

from tests.training.runner import run

MEGATRON_GPT_ARGS = (
    "--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 1 "
    "--expert-model-parallel-size 2 --expert-tensor-parallel-size 1 "
    "--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 --moe-token-dispatcher-type alltoall "
    "--moe-router-load-balancing-type aux_loss --disable-bias-linear "
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--ffn-hidden-size 128 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --seq-length 64 --max-position-embeddings 64 "
    "--attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02 "
    "--micro-batch-size 2 --global-batch-size 4 --train-iters 4 "
    "--lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2 --lr-decay-iters 4 "
    "--weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --use-distributed-optimizer "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 256 --split 99,1,0 "
    "--log-interval 1 --log-throughput --eval-interval 4 --eval-iters 1 --save-interval 4 "
).split()


def test_megatron_gpt_command_line_runs_unchanged(tmp_path):
    ckpt, tb = str(tmp_path / "ckpt"), str(tmp_path / "tb")
    result = run(MEGATRON_GPT_ARGS + ["--save", ckpt, "--load", ckpt, "--tensorboard-dir", tb], nproc=2).check()
    assert sorted(result.losses()) == [1, 2, 3, 4]
    assert "load_balancing_loss" in result.output, "MoE auxiliary loss is logged"
    assert "validation loss at iteration 4" in result.output
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "4"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [EventAccumulator(path).Reload() for path in glob.glob(os.path.join(tb, "events.*"))]
    tags = set().union(*(set(e.Tags()["scalars"]) for e in events))
    for tag in ("lm loss", "learning-rate", "grad-norm", "batch-size", "lm loss validation", "tokens-per-sec",
                "tflops-per-gpu"):
        assert tag in tags, f"TensorBoard scalar '{tag}' missing (have {sorted(tags)})"
