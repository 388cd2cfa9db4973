"""Exact resume: 2N iterations straight == N iterations, stop (``--exit-interval``), resume (``--load``), N more.

Covers the distributed optimizer's resume workaround (megatron_ext.training.optimizer_resume: Adam's per-parameter
step count), the RNG (dropout is on), the LR schedule and the data position; fp32 (and bf16) on the CPU, where every
logged ``lm loss`` and grad norm must agree to the printed digits. Both checkpoint formats: ``torch_dist`` (the
default) and the legacy ``torch``, whose distributed-optimizer load takes another path through megatron-core.
"""

import pytest

from megatron_ext.training.checkpointing import checkpoint_iterations
from tests.training.runner import TINY_SWA_HSA, finish, start


@pytest.mark.parametrize("flags, loading", [
    ([], "loading distributed checkpoint"),
    (["--ckpt-format", "torch"], "loading checkpoint"),
    (["--ckpt-format", "torch", "--bf16"], "loading checkpoint"),  # fp32 main params apart from the model's
], ids=["torch_dist", "torch", "torch-bf16"])
def test_stop_and_resume_matches_uninterrupted_run(tmp_path, flags, loading):
    iters = ["--train-iters", "6", "--save-interval", "3", *flags]
    straight = start(TINY_SWA_HSA + iters + ["--save", str(tmp_path / "straight"), "--keep-last-checkpoints", "1"])
    first = finish(start(TINY_SWA_HSA + iters + ["--save", str(tmp_path / "ckpt"), "--exit-interval", "3"])).check()
    second = start(TINY_SWA_HSA + iters + ["--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt")])
    straight, second = finish(straight).check(), finish(second).check()

    assert sorted(first.losses()) == [1, 2, 3]
    assert loading in second.output and "at iteration 3" in second.output
    assert sorted(second.losses()) == [4, 5, 6], "the resumed run must continue at iteration 4"
    resumed = {**first.losses(), **second.losses()}
    assert resumed == straight.losses()
    assert {**first.grad_norms(), **second.grad_norms()} == straight.grad_norms()
    # --keep-last-checkpoints 1: the iteration-3 checkpoint went once iteration 6 was complete.
    assert checkpoint_iterations(str(tmp_path / "straight")) == [6]
    assert checkpoint_iterations(str(tmp_path / "ckpt")) == [3, 6]
