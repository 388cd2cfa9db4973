"""What the kernel tests share: the device they run on and the relative-error oracle comparison."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; a non-finite value (an unwritten, poisoned element) fails."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values (an output element the kernel did not write?)"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
