"""Checkpoints survive preemption and a process killed mid-save: ``latest`` only ever names complete checkpoints."""

import os
import re
import signal
import time

from megatron_ext.training.checkpointing import (
    TRACKER_NAME,
    _AtomicTrackerFile,
    checkpoint_iterations,
    prune_checkpoints,
    read_latest_iteration,
    write_atomic,
)
from tests.training.runner import TINY_SWA_HSA, Run, finish, start


def _make_checkpoints(root, iterations, latest):
    for it in iterations:
        os.makedirs(root / f"iter_{it:07d}")
    (root / TRACKER_NAME).write_text(str(latest))


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / TRACKER_NAME
    path.write_text("100")
    write_atomic(str(path), "200")
    assert path.read_text() == "200"
    assert os.listdir(tmp_path) == [TRACKER_NAME], "no temporary file may be left behind"


def test_marker_unchanged_until_the_write_completes(tmp_path):
    (tmp_path / TRACKER_NAME).write_text("100")
    marker = _AtomicTrackerFile(str(tmp_path / TRACKER_NAME))
    marker.write("2")  # a process killed here (before close) must leave the old marker intact
    assert read_latest_iteration(str(tmp_path)) == 100
    marker.write("00")
    marker.close()
    assert read_latest_iteration(str(tmp_path)) == 200


def test_prune_keeps_newest_and_never_the_latest(tmp_path):
    _make_checkpoints(tmp_path, [10, 20, 30, 40], latest=30)  # iter 40: a partial save newer than latest
    assert prune_checkpoints(str(tmp_path), keep_last=2) == [10]
    assert checkpoint_iterations(str(tmp_path)) == [20, 30, 40]
    assert prune_checkpoints(str(tmp_path), keep_last=1) == [20]
    assert checkpoint_iterations(str(tmp_path)) == [30, 40]


def _wait_for(pattern: str, log_path: str, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if re.search(pattern, open(log_path).read()):
            return
        time.sleep(0.05)


def test_preemption_then_kill_during_save(tmp_path):
    """SIGUSR1 (SLURM's preemption warning) saves and exits 0; a later run SIGKILLed while it writes its next
    checkpoint leaves ``latest`` on the preemption checkpoint, which loads and repeats the same iterations."""
    ckpt, log_path = str(tmp_path / "ckpt"), str(tmp_path / "part1.log")
    common = TINY_SWA_HSA + ["--train-iters", "12", "--save-interval", "8", "--save", ckpt]

    # 1. Preempted after iteration 3: checkpoint at the iteration where training stopped, clean exit.
    proc = start(common, log_path=log_path)
    _wait_for(r"iteration\s+3/", log_path, proc)
    proc.send_signal(signal.SIGUSR1)  # SIGTERM is megatron's own --exit-signal
    preempted = finish(proc)
    assert preempted.returncode == 0, preempted.output[-3000:]
    assert "exiting program after receiving SIGTERM" in preempted.output
    stop = max(preempted.losses())
    assert 3 <= stop < 8
    assert read_latest_iteration(ckpt) == stop
    assert os.listdir(os.path.join(ckpt, f"iter_{stop:07d}"))

    # 2. Resume, and SIGKILL the process as soon as it starts writing the iteration-8 checkpoint.
    proc = start(common + ["--load", ckpt])
    partial = os.path.join(ckpt, "iter_0000008")
    deadline = time.monotonic() + 240
    while not os.path.exists(partial) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    killed = finish(proc)
    assert killed.returncode == -signal.SIGKILL, "the process ended before it started saving iteration 8"
    assert read_latest_iteration(ckpt) == stop, "latest must still name the last complete checkpoint"
    assert sorted(killed.losses()) == list(range(stop + 1, 9))

    # 3. The previous checkpoint loads, training from it repeats the same iterations exactly, then saves 8.
    again = finish(start(common + ["--load", ckpt, "--exit-interval", "8"])).check()
    assert f"at iteration {stop}" in again.output
    assert again.losses() == killed.losses()
    assert read_latest_iteration(ckpt) == 8
    assert os.listdir(os.path.join(ckpt, "iter_0000008")), "the re-done save must be complete"


def test_run_tracebacks_drop_only_the_worker_fd_sharing_noise():
    sharer = "\n".join([
        "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "/usr/lib/python3.12/multiprocessing/resource_sharer.py", line 138, in _serve',
        "[rank0]:     with self._listener.accept() as conn:",
        "[rank0]: ConnectionResetError: [Errno 104] Connection reset by peer",
    ])
    ours = "\n".join([
        "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "pretrain_hsa.py", line 107, in <module>',
        "[rank0]:     runtime.run_failing_fast(",
        "[rank0]: ValueError: sizes do not divide",
    ])
    assert Run(0, f"iteration 3\n{sharer}\ndone\n").tracebacks() == []
    found = Run(0, f"{sharer}\n{ours}\n").tracebacks()
    assert len(found) == 1 and found[0].endswith("ValueError: sizes do not divide")


def test_ctrl_c_saves_and_exits_cleanly_and_a_second_one_aborts(tmp_path):
    """The first Ctrl-C (SIGINT to the process group, as a terminal sends it, data-loader workers included) is a
    preemption: checkpoint at the current iteration, status 0, no traceback. A second Ctrl-C aborts at once (130)."""
    ckpt, log_path = str(tmp_path / "ckpt"), str(tmp_path / "ctrl_c.log")
    common = TINY_SWA_HSA + ["--train-iters", "200", "--save-interval", "1000", "--num-workers", "2"]

    proc = start(common + ["--save", ckpt], log_path=log_path, new_session=True)
    _wait_for(r"iteration\s+3/", log_path, proc)
    os.killpg(proc.pid, signal.SIGINT)
    stopped = finish(proc)
    assert stopped.returncode == 0, stopped.output[-3000:]
    assert "Ctrl-C: saving a checkpoint to --save and exiting at the end of this iteration" in stopped.output
    assert not stopped.tracebacks() and "the run failed" not in stopped.output, stopped.tracebacks()
    stop = max(stopped.losses())
    assert 3 <= stop < 200
    assert read_latest_iteration(ckpt) == stop
    assert os.listdir(os.path.join(ckpt, f"iter_{stop:07d}"))

    log_path = str(tmp_path / "ctrl_c_twice.log")
    proc = start(common, log_path=log_path, new_session=True)
    _wait_for(r"iteration\s+2/", log_path, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _wait_for("press Ctrl-C again to abort now", log_path, proc)  # two signals before the handler runs count once
    os.killpg(proc.pid, signal.SIGINT)
    aborted = finish(proc)
    assert aborted.returncode == 130, aborted.output[-3000:]
    assert "second Ctrl-C: aborting now without saving" in aborted.output
    assert not aborted.tracebacks(), aborted.tracebacks()
