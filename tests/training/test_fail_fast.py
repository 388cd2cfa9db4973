"""runtime.run_failing_fast: a failed run ends at once, even when a child process would block the exit."""

import os
import signal
import subprocess
import sys
import textwrap

from tests.training.runner import REPO

SCRIPT = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from megatron_ext.training.runtime import run_failing_fast

    def child():
        os.close(1), os.close(2)  # let the test's pipes close when the parent ends
        time.sleep(3600)

    def train(mode):
        # a non-daemon child that never ends: the interpreter's exit would join it forever
        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        print("child", proc.pid, flush=True)
        if mode == "error":
            raise ValueError("sizes do not divide")
        if mode == "exit3":
            sys.exit(3)
        if mode == "ctrl-c":  # a Ctrl-C that no preemption handler caught (--no-exit-signal-handler)
            raise KeyboardInterrupt

    if __name__ == "__main__":
        run_failing_fast(train, sys.argv[1])
""")


def _run(mode, timeout=60):
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith("child "):
            try:
                os.kill(int(line.split()[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return done


def test_an_exception_ends_the_process_with_its_traceback():
    done = _run("error")
    assert done.returncode == 1
    assert "ValueError: sizes do not divide" in done.stderr
    assert "the run failed; exiting with status 1" in done.stderr


def test_a_nonzero_sys_exit_keeps_its_status():
    done = _run("exit3")
    assert done.returncode == 3


def test_an_uncaught_ctrl_c_is_one_line_and_status_130():
    done = _run("ctrl-c")
    assert done.returncode == 130
    assert "interrupted (Ctrl-C); exiting with status 130 without saving" in done.stderr
    assert "Traceback" not in done.stderr and "the run failed" not in done.stderr


def test_a_model_config_error_is_one_line_before_anything_is_built():
    # HSAConfig's checks (field, problem, fix) ran inside megatron's model provider: a 30-line traceback per rank
    from tests.training.runner import TINY_SWA_HSA, run

    failed = run([*TINY_SWA_HSA, "--train-iters", "4", "--hsa-num-kv-heads", "3"], nproc=2)
    assert failed.returncode != 0
    line = "pretrain_hsa.py: HSAConfig.hsa_num_kv_heads: 3 does not divide num_attention_heads=4. Fix: use a divisor"
    assert failed.output.count(line) == 1, failed.output[-3000:]
    assert "[rank0]: Traceback" not in failed.output and "building GPT" not in failed.output
