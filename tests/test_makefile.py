"""The Makefile's test targets run the virtualenv's Python (torch and megatron-core live there)."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("target, marker", [("test", "-n 2 --dist loadscope tests"), ("test-gpu", "-m gpu tests")])
def test_test_targets_use_the_venv_python(target, marker):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    plan = subprocess.run(["make", "-n", target, "VENV=/venv-under-test"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    pytest_lines = [line for line in plan.splitlines() if "-m pytest" in line]
    assert pytest_lines == [f"/venv-under-test/bin/python -m pytest -q {marker}"], plan
    assert "pip install -q -e '.[dev]'" in plan, "the target builds the virtualenv first (the stamp)"
