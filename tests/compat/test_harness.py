"""The multi-rank harness: results in rank order, a failing rank is reported and nothing is left running."""

import multiprocessing
import socket

import pytest
import torch

from megatron_ext.testing import RankFailed, run_on_ranks


def _rank_and_sum():
    from megatron.core import parallel_state

    t = torch.tensor([float(torch.distributed.get_rank() + 1)])
    torch.distributed.all_reduce(t)
    return torch.distributed.get_rank(), parallel_state.get_tensor_model_parallel_world_size(), t.item()


def _rank1_fails_while_rank0_waits():
    if torch.distributed.get_rank() == 1:
        raise ValueError("rank 1 broke on purpose")
    torch.distributed.barrier()  # never completes: rank 1 is gone
    return "unreachable"


def test_results_come_back_in_rank_order():
    out = run_on_ranks(_rank_and_sum, 2, parallel_sizes={"tensor_model_parallel_size": 2})
    assert out == [(0, 2, 3.0), (1, 2, 3.0)]


def test_failing_rank_is_reported_and_no_process_or_port_leaks():
    # children that earlier tests of this process left running on purpose (megatron's checkpoint SyncManager) are
    # not the harness's
    before = set(multiprocessing.active_children())
    with pytest.raises(RankFailed, match="rank 1 broke on purpose"):
        run_on_ranks(_rank1_fails_while_rank0_waits, 2, timeout_s=120)
    assert set(multiprocessing.active_children()) - before == set()


def _rank1_starts_a_child_then_fails():
    import subprocess
    import sys

    if torch.distributed.get_rank() == 1:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(_CHILD_PID_FILE, "w") as f:
            f.write(str(child.pid))
        raise ValueError("rank 1 broke after starting a child")
    torch.distributed.barrier()


_CHILD_PID_FILE = "/tmp/megatron_ext_harness_child.pid"


def test_processes_started_by_a_failing_rank_are_ended_too():
    import os
    import time

    with pytest.raises(RankFailed, match="broke after starting a child"):
        run_on_ranks(_rank1_starts_a_child_then_fails, 2, timeout_s=120)
    pid = int(open(_CHILD_PID_FILE).read())
    os.remove(_CHILD_PID_FILE)
    for _ in range(50):  # reaped by init shortly after the SIGKILL
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {pid} of the failed rank is still running")


def test_free_port_is_outside_the_ephemeral_range_and_leaves_random_alone():
    import random

    from megatron_ext.compat import cpu as cpu_compat

    ephemeral_low, ephemeral_high = cpu_compat._ephemeral_port_range()
    random.seed(7)
    expected = random.random()
    random.seed(7)
    ports = [cpu_compat.free_port() for _ in range(5)]
    # training seeds `random` alike in every process: a port drawn from it would be the same in every test worker
    assert random.random() == expected
    assert all(not ephemeral_low <= p <= ephemeral_high for p in ports), ports
    for p in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", p))


def test_a_rendezvous_port_taken_before_the_bind_is_retried_on_a_new_one(monkeypatch):
    from megatron_ext.compat import cpu as cpu_compat

    real_free_port = cpu_compat.free_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", real_free_port()))
        taken.listen()
        handed_out = []

        def taken_port_first():
            handed_out.append(taken.getsockname()[1] if not handed_out else real_free_port())
            return handed_out[-1]

        monkeypatch.setattr(cpu_compat, "free_port", taken_port_first)
        out = run_on_ranks(_rank_and_sum, 2)
    assert out == [(0, 1, 3.0), (1, 1, 3.0)]
    assert len(handed_out) == 2 and handed_out[0] != handed_out[1]
