"""Which optional accelerators (Transformer Engine, apex) this Python can import; one check for every caller."""

from __future__ import annotations

import importlib.util

__all__ = ["module_available", "te_available", "apex_available"]


def module_available(name: str) -> bool:
    """Whether ``import name`` would find the package (without importing it: TE's import initialises CUDA)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def te_available() -> bool:
    return module_available("transformer_engine")


def apex_available() -> bool:
    return module_available("apex")
