"""Fused element-wise kernels (RMSNorm, rotary embedding, cross entropy) against what megatron-core runs without
Transformer Engine or apex, side by side.

    python benchmarks/fused.py                      # H100 shapes of SWA+HSA-345M at micro-batch 2 x 8K tokens
    python benchmarks/fused.py --smoke              # tiny shapes: checks the script (CPU: Triton interpreter)

RMSNorm (hidden 1024; QK-norm over 16 query / 2 key heads of 64), forward and backward, bf16:
  triton     megatron_ext.kernels.fused.rms_norm (one pass forward, one backward)
  reference  the fp32 PyTorch formula these layers ran before (and the test oracle)
  torch      torch.nn.functional.rms_norm (what megatron's WrappedTorchNorm runs)
Rotary embedding of q (16 heads) and k (2 heads) of 64, 16K tokens, bf16:
  triton     megatron_ext.kernels.fused.rotary
  megatron   megatron-core's unfused RoPE (what SelfAttention runs without Transformer Engine)
Cross entropy over the 100,278-token vocabulary of 16K tokens, bf16 logits:
  triton          megatron_ext.kernels.fused.cross_entropy
  megatron        megatron-core's vocab_parallel_cross_entropy (the default: fp32 copies of the logits)
  megatron_fused  megatron-core's --cross-entropy-loss-fusion 'native' path (torch.compile'd pieces)
Printed per case: forward / backward ms, the GB/s of the bytes a fused kernel must move, peak memory, and the
speed-up of the Triton kernel over each alternative in this same run. Rows go to ``--out`` (JSON lines).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import format_table, fwd_bwd_ms, peak_memory_gib, record  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "fused.jsonl")


def rms_norm_cases(tokens: int, hidden: int, heads: int, kv_heads: int, head_dim: int):
    return [("hidden", (tokens, hidden)), ("q_norm", (tokens, heads, head_dim)),
            ("k_norm", (tokens, kv_heads, head_dim))]


def bench_rms_norm(name, shape, dtype, device, backends):
    from megatron_ext.kernels.fused import rms_norm, rms_norm_reference

    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_()
    variants = {
        "triton": lambda: rms_norm(x, w, 1e-5, backend=backends),
        "reference": lambda: rms_norm_reference(x, w, 1e-5),
        "torch": lambda: torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-5),
    }
    # bytes a fused kernel must move: forward x in, y out; backward x and dy in, dx out
    elem = x.element_size() * x.numel()
    rows = []
    for variant, fn in variants.items():
        fwd, bwd = fwd_bwd_ms(fn, [x, w])
        peak = peak_memory_gib(lambda: fn().backward(torch.ones_like(x)))
        rows.append(dict(op="rms_norm", case=name, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                         variant=variant, fwd_ms=fwd, bwd_ms=bwd, fwd_gbs=2 * elem / fwd / 1e6,
                         bwd_gbs=3 * elem / bwd / 1e6 if bwd > 0 else float("nan"), peak_gib=peak))
    return rows


def bench_rotary(name, seq, batch, heads, head_dim, dtype, device, backends):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_ext.kernels.fused import rotary

    x = torch.randn(seq, batch, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    freqs = RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, use_cpu_initialization=True)(seq).to(device)
    variants = {
        "triton": lambda: rotary(x, freqs, backend=backends),
        "megatron": lambda: _apply_rotary_pos_emb_bshd(x, freqs),
    }
    elem = x.element_size() * x.numel()
    rows = []
    for variant, fn in variants.items():
        fwd, bwd = fwd_bwd_ms(fn, [x])
        peak = peak_memory_gib(lambda: fn().backward(torch.ones_like(x)))
        rows.append(dict(op="rotary", case=name, shape=list(x.shape), dtype=str(dtype).replace("torch.", ""),
                         variant=variant, fwd_ms=fwd, bwd_ms=bwd, fwd_gbs=2 * elem / fwd / 1e6,
                         bwd_gbs=2 * elem / bwd / 1e6 if bwd > 0 else float("nan"), peak_gib=peak))
    return rows


def bench_cross_entropy(tokens, batch, vocab, dtype, device, backends, tp_group):
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_ext.kernels.fused import cross_entropy

    logits = torch.randn(tokens, batch, vocab, device=device, dtype=dtype).mul_(2).requires_grad_()
    target = torch.randint(0, vocab, (tokens, batch), device=device)
    variants = {
        "triton": lambda: cross_entropy(logits, target, tp_group=tp_group, backend=backends),
        "megatron": lambda: vocab_parallel_cross_entropy(logits, target, tp_group=tp_group),
        "megatron_fused": lambda: fused_vocab_parallel_cross_entropy(logits, target, tp_group),
    }
    elem = logits.element_size() * logits.numel()
    rows = []
    for variant, fn in variants.items():
        try:
            fwd, bwd = fwd_bwd_ms(fn, [logits])
            peak = peak_memory_gib(lambda: fn().sum().backward())
        except Exception as exc:  # megatron's fused path needs torch.compile to work here
            rows.append(dict(op="cross_entropy", case=f"{tokens}x{batch}x{vocab}", variant=variant,
                             error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        rows.append(dict(op="cross_entropy", case=f"{tokens}x{batch}x{vocab}", shape=[tokens, batch, vocab],
                         dtype=str(dtype).replace("torch.", ""), variant=variant, fwd_ms=fwd, bwd_ms=bwd,
                         fwd_gbs=elem / fwd / 1e6, bwd_gbs=2 * elem / bwd / 1e6 if bwd > 0 else float("nan"),
                         peak_gib=peak))
    return rows


def add_speedups(rows):
    """Triton's (fwd + bwd) speed-up over every other variant of the same case."""
    by_case = {}
    for r in rows:
        if "fwd_ms" in r:
            by_case.setdefault((r["op"], r["case"]), {})[r["variant"]] = r["fwd_ms"] + r["bwd_ms"]
    for r in rows:
        total = by_case.get((r["op"], r["case"]), {})
        if "fwd_ms" in r and "triton" in total:
            r["triton_speedup"] = (r["fwd_ms"] + r["bwd_ms"]) / total["triton"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=100278)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, fp32; runs on a CPU in the interpreter")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.tokens, args.batch, args.hidden, args.heads = 16, 2, 64, 4
        args.kv_heads, args.head_dim, args.vocab = 2, 16, 300
    from megatron.core import parallel_state

    from megatron_ext.compat import cpu as cpu_compat
    from megatron_ext.testing import initialize_megatron_parallel

    if not torch.cuda.is_available():
        cpu_compat.apply()
    cpu_compat.init_process_group(0, 1, port=cpu_compat.free_port())
    initialize_megatron_parallel(seed=1234)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "auto" if device.type == "cuda" else "triton"
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tokens = args.tokens * args.batch
    rows = []
    for name, shape in rms_norm_cases(tokens, args.hidden, args.heads, args.kv_heads, args.head_dim):
        rows += bench_rms_norm(name, shape, dtype, device, backend)
    for name, heads in (("q", args.heads), ("k", args.kv_heads)):
        rows += bench_rotary(name, args.tokens, args.batch, heads, args.head_dim, dtype, device, backend)
    rows += bench_cross_entropy(args.tokens, args.batch, args.vocab, dtype, device, backend, tp_group)
    rows = add_speedups(rows)
    print(format_table(rows, ["op", "case", "variant", "fwd_ms", "bwd_ms", "fwd_gbs", "bwd_gbs", "peak_gib",
                              "triton_speedup", "error"]))
    if not args.smoke:
        for r in rows:
            record(args.out, bench="fused", **r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
