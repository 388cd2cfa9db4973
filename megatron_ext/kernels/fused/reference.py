"""The fused element-wise ops in plain PyTorch: the readable definitions and the test oracles.

* RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32, y in x's dtype.
* Rotary position embedding (RoPE, megatron's non-interleaved "rotate half" layout) on [s, b, h, d] with angles
  freqs [s, 1, 1, r] (r <= d even): with x1, x2 the halves of the first r channels and f1, f2 the halves of the
  angles, out = [x1 cos f1 - x2 sin f1, x2 cos f2 + x1 sin f2, x[r:]], in fp32, returned in x's dtype.
* Cross entropy over a (vocabulary-parallel) last dimension: loss = logsumexp(logits) - logits[target], in fp32.
  With tensor parallelism each rank holds the vocabulary slice [rank * V_local, (rank + 1) * V_local); a target
  outside the slice contributes no target logit on that rank (megatron's vocab-parallel convention).
"""

from __future__ import annotations

import torch

__all__ = ["rms_norm_reference", "rotary_reference", "cross_entropy_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and returned in x's dtype. x: [..., D]."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rotary_reference(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE of x ``[s, b, h, d]`` by the angles ``freqs [s, 1, 1, r]`` (fp32 math, x's dtype out)."""
    r = freqs.shape[-1]
    xf, f = x.float(), freqs.float()
    x1, x2, rest = xf[..., : r // 2], xf[..., r // 2 : r], xf[..., r:]
    f1, f2 = f[..., : r // 2], f[..., r // 2 :]
    out = torch.cat([x1 * f1.cos() - x2 * f1.sin(), x2 * f2.cos() + x1 * f2.sin(), rest], dim=-1)
    return out.to(x.dtype)


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Per-token loss (fp32, target's shape) of logits ``[..., V_local]`` against int targets ``[...]``.

    With a tensor-parallel group of more than one rank, the logits are this rank's vocabulary slice and the
    log-sum-exp and target logit are combined over the group (differentiably, through all-reduces).
    """
    logits = logits.float()
    v_local = logits.shape[-1]
    world = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    start = 0 if world == 1 else torch.distributed.get_rank(tp_group) * v_local
    local = target.long() - start
    in_slice = (local >= 0) & (local < v_local)
    picked = logits.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1) * in_slice
    if world == 1:
        return torch.logsumexp(logits, dim=-1) - picked
    # Every rank computes the same (replicated) loss: sum the partial terms forward, pass gradients through as they
    # are (megatron's reduce_from_tensor_model_parallel_region), each rank then gets its own slice's gradient.
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region as all_reduce

    m = logits.detach().amax(dim=-1)
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    sum_exp = all_reduce((logits - m.unsqueeze(-1)).exp().sum(dim=-1), group=tp_group)
    return m + sum_exp.log() - all_reduce(picked, group=tp_group)
