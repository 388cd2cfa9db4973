"""SLURM-style preemption: SIGUSR1 (the warning) or SIGTERM makes the run save a checkpoint and exit cleanly."""

import os
import re
import signal
import time

from megatron_ext.training.checkpointing import read_latest_iteration
from tests.training.runner import TINY_SWA_HSA, finish, start


def test_sigusr1_saves_and_exits(tmp_path):
    ckpt, log_path = str(tmp_path / "ckpt"), str(tmp_path / "train.log")
    proc = start(TINY_SWA_HSA + ["--train-iters", "1000", "--save-interval", "1000", "--save", ckpt],
                 log_path=log_path)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if re.search(r"iteration\s+3/", open(log_path).read()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # SIGTERM is megatron's own --exit-signal
    result = finish(proc)
    assert result.returncode == 0, result.output[-3000:]
    assert "exiting program after receiving SIGTERM" in result.output
    last = max(result.losses())
    assert 3 <= last < 1000
    assert read_latest_iteration(ckpt) == last, "the checkpoint is taken at the iteration where training stopped"
    assert os.listdir(os.path.join(ckpt, f"iter_{last:07d}"))
