"""benchmarks/train.py refuses model names it does not know and reports a failed model run in its exit status."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "train.py")


def _run(*argv, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_unknown_model_is_refused_naming_the_valid_ones(tmp_path):
    proc = _run("--models", "nope", "--smoke", "--log-dir", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown model(s) nope" in proc.stderr and "swa_hsa_345m, gpt_345m_swa" in proc.stderr
    assert not os.listdir(tmp_path), "nothing may run"


def test_failed_model_run_exits_non_zero(tmp_path):
    # An unknown pretrain_hsa.py flag fails the one run at argument parsing, before any training.
    proc = _run("--models", "gpt_345m_full", "--smoke", "--extra=--no-such-flag", "--log-dir", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed: gpt_345m_full" in proc.stderr
