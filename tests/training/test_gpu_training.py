"""pretrain_hsa.py on a GPU: bf16, NCCL, the Triton kernels, stop and resume (run with `make test-gpu`)."""

import pytest

from megatron_ext.training.checkpointing import read_latest_iteration
from tests.training.runner import TINY_SWA_HSA, run


@pytest.mark.gpu
def test_bf16_swa_hsa_trains_and_resumes_on_gpu(tmp_path):
    args = [a for a in TINY_SWA_HSA if a not in ("--hsa-kernel-backend", "reference")]
    args += ["--bf16", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--train-iters", "6",
             "--save-interval", "3", "--save", str(tmp_path / "ckpt")]
    first = run(args + ["--exit-interval", "3"]).check()
    assert sorted(first.losses()) == [1, 2, 3]
    assert "MFU:" in first.output and "max memory:" in first.output
    second = run(args + ["--load", str(tmp_path / "ckpt")]).check()
    assert "at iteration 3" in second.output and sorted(second.losses()) == [4, 5, 6]
    assert read_latest_iteration(str(tmp_path / "ckpt")) == 6
    assert all(float(v) < 10 for v in second.losses().values())
