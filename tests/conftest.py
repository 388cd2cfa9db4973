"""Suite-wide setup.

On a machine without a CUDA GPU, Triton kernels run in the Triton interpreter: the variable must be set before
anything imports triton (megatron-core imports it too), so it is set here, at collection time.
Tests that need a GPU carry ``@pytest.mark.gpu`` and are skipped with a reason on CPU.
"""

import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the imports themselves
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
