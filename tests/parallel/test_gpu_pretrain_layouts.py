"""pretrain_hsa.py on 2 GPUs over NCCL (bf16, the Triton kernels): every 2-GPU layout trains like one GPU.

The CPU/gloo tests check the layouts in fp32 (``test_layouts.py``, in-process) and the driver at CP=2
(``test_pretrain_context_parallel.py``); this one runs the real driver on the GPU stack those cannot reach: NCCL,
bf16 with fp32 main weights, the Triton HSA kernels, the project's grouped-GEMM MoE experts. As on the CPU, one GPU
trains iteration 1 and saves (with ``--dist-ckpt-optim-fully-reshardable``, so that the optimizer state loads at
another TP/PP); then one GPU and each 2-GPU layout resume from a copy of that checkpoint (resharded at load) and train
iterations 2-4 on the same global batches. EP 2 gives the experts an optimizer of their own, into which megatron-core
cannot load one GPU's optimizer state: it resumes the weights alone (``--no-load-optim``), beside one GPU doing the
same. Logged losses must agree within bf16 reduction-order noise (measured 2e-4 after 6 steps for the 8B-A1B slice,
``benchmarks/results/parallel.md``).
"""

import shutil

import pytest
import torch

from tests.training.runner import TINY_SWA_HSA, finish, start

_MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2",
        "--moe-token-dispatcher-type", "alltoall", "--moe-router-load-balancing-type", "aux_loss"]

# name -> (flags, GPUs, the run it must match)
LAYOUTS = {
    "one": ([], 1, None),
    "tp2_sp": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2, "one"),
    "pp2": (["--pipeline-model-parallel-size", "2"], 2, "one"),
    "cp2": (["--context-parallel-size", "2"], 2, "one"),
    "one_weights": (["--no-load-optim"], 1, None),
    "ep2_weights": (["--expert-model-parallel-size", "2", "--no-load-optim"], 2, "one_weights"),
}


def _args():
    args = [a for a in TINY_SWA_HSA if a not in ("--hsa-kernel-backend", "reference")]

    def put(flag, value):
        args[args.index(flag) + 1] = value

    # 4 layers, so that PP=2 splits the HSA group: stage 1's HSA layer reads the memory stage 0 built.
    put("--num-layers", "4")
    put("--layer-pattern", "swa [hsa swa hsa]")
    put("--hsa-chunk-size", "16")  # the Triton kernels' smallest chunk on a GPU
    put("--hsa-topk", "3")
    put("--seq-length", "256")
    put("--max-position-embeddings", "256")
    put("--swa-window-size", "32")
    put("--hidden-size", "128")
    put("--ffn-hidden-size", "192")
    put("--vocab-size", "256")  # padded alike at TP 1 and 2 (megatron pads to 128 x TP)
    return args + _MOE + ["--bf16", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--train-iters", "4",
                          "--dist-ckpt-optim-fully-reshardable"]


@pytest.mark.gpu
def test_two_gpu_layouts_resume_like_one_gpu(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    args = _args()
    first = tmp_path / "first"
    finish(start(args + ["--save", str(first), "--save-interval", "1", "--exit-interval", "1"])).check()
    losses = {}
    for name, (flags, nproc, _) in LAYOUTS.items():
        ckpt = tmp_path / name
        shutil.copytree(first, ckpt)
        run = finish(start(args + flags + ["--load", str(ckpt), "--save", str(ckpt), "--save-interval", "100"],
                           nproc=nproc), timeout=600).check()
        assert "at iteration 1" in run.output, name
        losses[name] = run.losses()
        assert sorted(losses[name]) == [2, 3, 4], name
    for name, (_, _, reference) in LAYOUTS.items():
        print(f"{name:12s} vs {reference or '-':12s}", *(losses[name][i] for i in (2, 3, 4)))
        for iteration in (2, 3, 4) if reference else ():
            assert float(losses[name][iteration]) == pytest.approx(float(losses[reference][iteration]), rel=2e-3), \
                (name, iteration, losses[name], losses[reference])
