"""Helpers shared by the Triton kernel families (HSA, GCA, fused element-wise ops).

Nothing here launches a kernel: it answers "may a Triton kernel run on these tensors", maps dtypes, and holds the
small numeric helpers every family needs. Importing this module never imports triton eagerly, so the PyTorch
references stay usable on machines without it.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = [
    "BACKENDS",
    "interpreter_enabled",
    "triton_available",
    "resolve_backend",
    "backend_for_sizes",
    "next_power_of_2",
    "dot_precision",
    "check_dtype",
    "SUPPORTED_DTYPES",
    "POISON_ENV",
    "empty_output",
    "segment_offsets",
]

# Set to 1 (tests do) to fill every kernel output buffer with NaN / a sentinel before launch, so elements a kernel
# forgets to write show up in the comparison instead of passing by luck.
POISON_ENV = "MEGATRON_EXT_POISON_OUTPUTS"
BACKENDS = ("auto", "triton", "reference")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` set before triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def resolve_backend(backend: str, *tensors: torch.Tensor, auto_in_interpreter: bool = True) -> str:
    """Turn ``backend="auto"|"triton"|"reference"`` into "triton" or "reference".

    "auto" picks Triton when every tensor lives on a CUDA device, or when the interpreter is on (CPU tensors) and
    ``auto_in_interpreter``; otherwise the PyTorch reference. The element-wise kernels (``kernels.fused``) pass
    ``auto_in_interpreter=False``: in the interpreter they would only slow a CPU model down, so "auto" keeps PyTorch
    there and only an explicit "triton" runs them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = triton_available() and (on_cuda or (interpreter_enabled() and not any(t.is_cuda for t in tensors)))
    if backend == "triton":
        if not runnable:
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is "
                "imported; use backend='reference' or 'auto' instead"
            )
        return "triton"
    if not on_cuda and not auto_in_interpreter:
        return "reference"
    return "triton" if runnable else "reference"


def backend_for_sizes(backend: str, unsupported: str | None, *tensors: torch.Tensor) -> str:
    """``resolve_backend`` for kernels that cover only some sizes. ``unsupported`` says why the Triton kernels cannot
    take these sizes, or is None: "auto" then runs the reference (which covers any), "triton" raises that reason."""
    resolved = resolve_backend(backend, *tensors)
    if resolved == "triton" and unsupported is not None:
        if backend == "triton":
            raise ValueError(
                unsupported + "; use backend='reference' or 'auto' (which runs such sizes on the reference)"
            )
        return "reference"
    return resolved


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (no TF32), native for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def empty_output(*shape, device, dtype) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled (integers: -12345) when ``POISON_ENV`` is set."""
    out = torch.empty(*shape, device=device, dtype=dtype)
    if os.environ.get(POISON_ENV, "0") not in ("", "0"):
        out.fill_(float("nan") if dtype.is_floating_point else -12345)
    return out


def segment_offsets(sorted_keys: torch.Tensor, num_segments: int) -> torch.Tensor:
    """CSR offsets of sorted segment keys: ``offsets[i]`` = number of keys below i, for i in 0..num_segments
    (int32, ``[num_segments + 1]``); keys >= num_segments (left-out entries) come after the last segment.

    ``torch.bincount`` + ``cumsum`` would give the same numbers, but bincount copies the largest key to the host to
    size its output: a device synchronisation in every backward that builds a reverse index.
    """
    bounds = torch.arange(num_segments + 1, device=sorted_keys.device, dtype=sorted_keys.dtype)
    return torch.searchsorted(sorted_keys, bounds).to(torch.int32)
