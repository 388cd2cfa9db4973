"""pretrain_hsa.py on a GPU: bf16, NCCL, the Triton kernels, stop and resume (run with `make test-gpu`)."""

import pytest

from megatron_ext.training.checkpointing import read_latest_iteration
from tests.training.runner import TINY_SWA_HSA, run


@pytest.mark.gpu
def test_bf16_swa_hsa_trains_and_resumes_on_gpu(tmp_path):
    args = [a for a in TINY_SWA_HSA if a not in ("--hsa-kernel-backend", "reference")]
    args[args.index("--hsa-chunk-size") + 1] = "16"  # the Triton kernels' smallest chunk on a GPU
    args += ["--bf16", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--train-iters", "6"]
    straight_args = list(args)
    args += ["--save-interval", "3", "--save", str(tmp_path / "ckpt")]
    first = run(args + ["--exit-interval", "3"]).check()
    assert sorted(first.losses()) == [1, 2, 3]
    assert "MFU:" in first.output and "max memory:" in first.output
    second = run(args + ["--load", str(tmp_path / "ckpt")]).check()
    assert "at iteration 3" in second.output and sorted(second.losses()) == [4, 5, 6]
    assert read_latest_iteration(str(tmp_path / "ckpt")) == 6
    # The same 6 iterations straight: a resume that lost Adam's step count (or the data position) drifts by
    # about 0.3% within two iterations; kernels whose reductions run in a different order would stay far below.
    straight = run(straight_args).check()
    resumed, reference = second.losses(), straight.losses()
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    for iteration in (4, 5, 6):
        assert float(resumed[iteration]) == pytest.approx(float(reference[iteration]), rel=2e-4), iteration
    for iteration in (1, 2, 3):
        assert float(first.losses()[iteration]) == pytest.approx(float(reference[iteration]), rel=2e-4), iteration
