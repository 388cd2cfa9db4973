"""`make demo`, the README's main job, end to end on the CPU: preprocess, train, stop, resume, validate, convert to
Hugging Face and continue a prompt."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_the_whole_path(tmp_path, megatron_world):
    # megatron_world: this process listens on MASTER_PORT, which the demo's own runs must not take over
    assert "MASTER_PORT" in os.environ
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.demo", "--output-dir", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4] converting"):
        assert step in out, out
    losses = {int(it): float(loss) for it, loss in re.findall(r"^\s+(\d+) \| ([0-9.]+)$", out, re.M)}
    assert sorted(losses) == list(range(1, 41)), "every iteration of both runs is logged once"
    assert losses[40] < losses[1] - 1.0, "the resumed run goes on learning"
    assert "validation lm loss at iteration 40" in out
    assert "latest: iteration 40" in out
    assert re.search(r"the Hugging Face model continues .*: '.+'", out)
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
