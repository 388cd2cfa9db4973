"""Every kernel test runs with poisoned outputs: ``empty_output`` buffers start as NaN (integers: -12345), so an
element a kernel forgets to write fails the comparison instead of passing by luck."""

import pytest

from megatron_ext.kernels.utils import POISON_ENV


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")
