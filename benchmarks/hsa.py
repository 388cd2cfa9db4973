"""Benchmark the HSA kernels (configs A, B, C of performance.md) against dense and sliding-window attention.

For every config and length it measures, in one process on the same inputs:
  hsa_attention forward / backward (Triton), effective TFLOP/s (valid selected chunks only), the K/V bytes the
  selected chunks represent per forward (gather GB/s), peak memory of forward+backward;
  hsa_retrieval forward (scoring + streaming top-k + weights) time and its peak memory above the inputs;
  cuDNN dense causal attention (SDPA) and FlexAttention sliding window (window W = K*S, the tokens HSA attends to)
  forward / backward, and the ratios.
Selections come from hsa_retrieval on random retrieval queries and landmarks: uniformly random causal chunks.

  python benchmarks/hsa.py                      # all configs, 8K..128K, bf16
  python benchmarks/hsa.py --configs A --seq-lens 65536 --baselines dense --variants auto,auto_split
Results: one JSON object per (config, length, baseline) appended to --out (default benchmarks/results/hsa.jsonl).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, format_table, fwd_bwd_ms, peak_memory_gib, record, tflops  # noqa: E402
from megatron_ext.kernels.hsa import hsa_attention, hsa_retrieval  # noqa: E402

# name: (Hq, Hk, head dim, top-k); chunk size 64 and retrieval head dim 128 for all.
# (Hq, Hk, D, top-k): A, B, C of performance.md; M = the HSA layers of SWA+HSA-345M (examples/swa_hsa_345m.yaml)
CONFIGS = {"A": (64, 4, 128, 16), "B": (16, 1, 64, 8), "C": (16, 8, 128, 16), "M": (16, 1, 64, 32)}
CHUNK = 64
RETRIEVAL_DIM = {"M": 1024}  # retrieval head width per config (the 345M model retrieves with one 1024-wide head)
DEFAULT_RETRIEVAL_DIM = 128
H100_BF16_PEAK_TFLOPS = 989.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for --smoke (Triton interpreter)


def allocated_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def dense_causal(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


_flex = {}


def flex_sliding_window(q, k, v, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex:
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    L = q.shape[2]
    key = (L, window)
    if key not in _flex:

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        # _compile=True builds the block mask block by block (the eager path materialises L x L: OOM at 128K)
        _flex[key] = create_block_mask(sliding, None, None, L, L, device=q.device, _compile=True)
    return _flex["fn"](q, k, v, block_mask=_flex[key])


SWEEP = [  # (schedule, TUNING overrides) tried by --sweep; kernel: (num_warps, num_stages), "*_rows": rows per tile
    ("auto", {}),
    ("auto", {"token_fwd": (2, 2)}),
    ("auto", {"token_fwd": (1, 4)}),
    ("auto", {"chunk_bwd": (8, 1)}),
    ("auto", {"chunk_bwd": (8, 2)}),
    ("auto", {"chunk_bwd": (8, 3)}),
    ("auto", {"bwd_token_range": 0}),
    ("auto", {"bwd_token_range": 8192}),
    # split backward: dK/dV (fp32) and dq (TUNING["bwd_dq_acc"]) add with atomics (no per-slot dq buffer)
    ("auto", {"bwd_token_range": 512}),
    ("auto", {"bwd_token_range": 1024}),
    ("auto", {"bwd_token_range": 2048}),
    ("auto", {"bwd_token_range": 4096}),
    ("auto", {"bwd_token_range": 1024, "chunk_bwd": (8, 2)}),
    ("chunk", {}),
    ("chunk", {"fwd_token_range": 512}),
    ("chunk", {"fwd_token_range": 1024}),
    ("chunk", {"fwd_token_range": 1024, "chunk_fwd": (4, 2)}),
    ("chunk", {"fwd_token_range": 1024, "chunk_fwd_rows": 128, "chunk_fwd": (4, 2)}),
    ("chunk", {"fwd_token_range": 2048}),
    ("chunk", {"fwd_token_range": 4096}),
    ("chunk", {"fwd_token_range": 8192}),
    ("chunk", {"fwd_token_range": 2048, "chunk_fwd_rows": 128, "chunk_fwd": (8, 1)}),
    ("chunk", {"fwd_token_range": 2048, "chunk_fwd": (4, 2)}),
    ("chunk", {"fwd_token_range": 2048, "chunk_fwd_rows": 32, "chunk_fwd": (2, 1)}),
]


def retrieval_inputs(config: str, L: int, dtype: torch.dtype):
    """(generator, retrieval queries, landmarks) of one (config, length); the generator goes on to attention_inputs,
    so every script section sees the same selections and the same q/k/v."""
    Hk, C = CONFIGS[config][1], L // CHUNK
    gen = torch.Generator(device=DEVICE).manual_seed(L)
    dr = RETRIEVAL_DIM.get(config, DEFAULT_RETRIEVAL_DIM)
    q_r = torch.randn(1, L, Hk, dr, device=DEVICE, dtype=dtype, generator=gen)
    lmk = torch.randn(1, C, Hk, dr, device=DEVICE, dtype=dtype, generator=gen)
    return gen, q_r, lmk


def attention_inputs(config: str, L: int, dtype: torch.dtype, gen, requires_grad: bool = True):
    """q [1, L, Hq, D] and chunk K/V [1, C*S, Hk, D] drawn from ``gen``."""
    Hq, Hk, D, _ = CONFIGS[config]
    rows = L // CHUNK * CHUNK
    q = torch.randn(1, L, Hq, D, device=DEVICE, dtype=dtype, generator=gen)
    k = torch.randn(1, rows, Hk, D, device=DEVICE, dtype=dtype, generator=gen)
    v = torch.randn(1, rows, Hk, D, device=DEVICE, dtype=dtype, generator=gen)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def sweep(config: str, L: int, dtype: torch.dtype, rep: int):
    """Time forward/backward of each SWEEP entry; print one line each."""
    from megatron_ext.kernels.hsa import attention

    K, S = CONFIGS[config][3], CHUNK
    gen, q_r, lmk = retrieval_inputs(config, L, dtype)
    idx, w = hsa_retrieval(q_r, lmk, chunk_size=S, topk=K)
    q, k, v = attention_inputs(config, L, dtype, gen)
    w = w.detach().requires_grad_()
    default = dict(attention.TUNING)
    for schedule, override in SWEEP:
        attention.TUNING.update(override)
        try:
            f, b = fwd_bwd_ms(
                lambda: hsa_attention(q, k, v, w, idx, chunk_size=S, schedule=schedule), (q, k, v, w), rep=rep
            )
            name = override or "default"
            print(f"sweep {config} L={L} {schedule:5s} {name}: fwd {f:.3f} ms bwd {b:.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"sweep {config} L={L} {schedule} {override}: failed {type(e).__name__}: {e}", flush=True)
        attention.TUNING.clear()
        attention.TUNING.update(default)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@triton.jit
def _gather_only_kernel(K, V, IDX, OUT, L, s_kl, HK: tl.constexpr, TOPK: tl.constexpr, S: tl.constexpr,
                        D: tl.constexpr):
    """The token-schedule forward's memory traffic alone: per (token, KV head) load the K and V chunks of every
    selected slot and reduce them (no attention math), so its time is the gather floor of that schedule."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([S, D], dtype=tl.float32)
    for slot in range(TOPK):
        c = tl.maximum(tl.load(IDX + (t.to(tl.int64) * HK + h) * TOPK + slot), 0)
        rows = (c * S + offs_s).to(tl.int64)
        off = rows[:, None] * s_kl + h * D + offs_d[None, :]
        acc += tl.load(K + off).to(tl.float32) + tl.load(V + off).to(tl.float32)
    tl.store(OUT + (t.to(tl.int64) * HK + h) * D + offs_d, tl.sum(acc, 0))


def gather_roof(config: str, L: int, dtype: torch.dtype, rep: int, once: bool = False):
    """Gather floor of the token-schedule forward: the same chunk loads with random (retrieved) selections and with
    every token reading the same K chunks (all L2 hits); printed with the HSA forward of the same selections, and of
    the selections folded into the first 512 and 128 chunks (id mod n: a K/V working set of n * S * D * 4 bytes per
    KV head, which shows whether L2 capacity or L2 bandwidth bounds it). ``once``: run each kernel once, untimed,
    for a profiler (``ncu --kernel-name regex:_hsa_fwd_token_kernel ...``)."""
    _, Hk, D, K = CONFIGS[config]
    S = CHUNK
    gen, q_r, lmk = retrieval_inputs(config, L, dtype)
    idx, w = hsa_retrieval(q_r, lmk, chunk_size=S, topk=K)
    q, k, v = attention_inputs(config, L, dtype, gen, requires_grad=False)
    out = torch.empty(L, Hk, D, device=DEVICE, dtype=torch.float32)
    hot = torch.arange(K, device=DEVICE, dtype=idx.dtype).expand_as(idx).contiguous()
    nbytes = 2 * S * D * k.element_size() * (idx >= 0).sum().item()

    def timed(name, fn):
        if once:
            fn()
            torch.cuda.synchronize()
            print(f"gather roof {config} L={L} {name}: ran once", flush=True)
            return
        ms = triton.testing.do_bench(fn, rep=rep)
        print(f"gather roof {config} L={L} {name}: {ms:.3f} ms, {nbytes / ms / 1e9:.2f} TB/s", flush=True)

    for name, sel in (("gather only, retrieved", idx), ("gather only, same chunks", hot)):
        timed(name, lambda sel=sel: _gather_only_kernel[(L, Hk)](k, v, sel, out, L, k.stride(1), HK=Hk, TOPK=K, S=S,
                                                                 D=D, num_warps=4, num_stages=2))
    timed("HSA token fwd, retrieved", lambda: hsa_attention(q, k, v, w, idx, chunk_size=S, schedule="token"))
    for n in (512, 128):
        if n < L // S:
            folded = torch.where(idx >= 0, idx % n, idx)
            timed(f"HSA token fwd, chunk ids mod {n} ({n * S * D * 4 / 2**20:.1f} MiB K/V per head)",
                  lambda sel=folded: hsa_attention(q, k, v, w, sel, chunk_size=S, schedule="token"))


# Kernel variants the benchmark can time side by side: name -> (schedule, TUNING overrides).
# the defaults before session 15 (2026-11-24): no passes by token ranges into fp16 accumulators; the older "previous
# defaults" below build on it
SESSION14 = {"fwd_token_range": 0, "bwd_dq_acc": "fp32"}
VARIANTS = {
    "auto": ("auto", {}),
    # chunk backward split into token ranges: atomics for dK/dV (fp32) and dq (fp16 for bf16 since session 15)
    "auto_split": ("auto", {"bwd_token_range": 4096}),
    "auto_split1024": ("auto", {"bwd_token_range": 1024}),
    "token": ("token", {}),
    "chunk": ("chunk", {}),
    "chunk_unsplit": ("chunk", {"fwd_token_range": 0, "bwd_token_range": 0}),  # per-slot buffers, no atomics
    "auto_session14": ("auto", SESSION14),
    # chunk forward by token ranges, adding into an fp32 or an fp16 (scaled) accumulator with atomics
    "chunk_atomic": ("chunk", {"fwd_token_range": 1024, "fwd_atomic_acc": "fp32"}),
    **{f"chunk_atomic16_{r}": ("chunk", {"fwd_token_range": r, "fwd_atomic_acc": "fp16"}) for r in (1024, 2048, 4096)},
    # both passes by the same token ranges: fp16 accumulators for the output and dq (or fp32 for dq), fp32 dK/dV
    **{f"split16_{r}": ("chunk", {"fwd_token_range": r, "fwd_atomic_acc": "fp16", "bwd_token_range": r,
                                  "bwd_dq_acc": "fp16"}) for r in (1024, 2048, 4096, 8192)},
    "split32_2048": ("chunk", {"fwd_token_range": 2048, "fwd_atomic_acc": "fp16", "bwd_token_range": 2048,
                               "bwd_dq_acc": "fp32"}),
    "auto_nosplit": ("auto", {**SESSION14, "bwd_token_range": 0}),  # never split the backward (before session 3)
    # the defaults before session 5: per-thread K/V loads in the token forward, one chunk-backward launch for all
    # KV heads with the slot sum after it
    "auto_session4": ("auto", {**SESSION14, "token_fwd_tma": False, "bwd_head_groups": 1}),
    # the defaults before session 6: per-slot dq rows for every group size (no dS rows), 2-stage chunk backward at
    # head dim 128, the reverse index built by the backward
    "auto_session5": ("auto", {**SESSION14, "bwd_dq": "dq", "chunk_bwd": {64: (8, 3), 128: (8, 2), "default": (8, 1)},
                               "reverse_index_beside_fwd": False}),
    # the defaults before session 7: the token forward gathering K and V (no P-row forward)
    "auto_session6": ("auto", {**SESSION14, "fwd_p_rows": False}),
}


def time_hsa(q, k, v, w, idx, S, variant, rep):
    """(fwd ms, bwd ms, peak GiB, peak above the inputs GiB) of one variant."""
    from megatron_ext.kernels.hsa import attention

    schedule, overrides = VARIANTS[variant]
    saved = dict(attention.TUNING)
    attention.TUNING.update(overrides)
    try:

        def hsa():
            return hsa_attention(q, k, v, w, idx, chunk_size=S, schedule=schedule)

        fwd, bwd = fwd_bwd_ms(hsa, (q, k, v, w), rep=rep)
        base_mem = allocated_bytes()
        peak = peak_memory_gib(lambda: hsa().backward(torch.ones_like(q)))
    finally:
        attention.TUNING.clear()
        attention.TUNING.update(saved)
    return fwd, bwd, peak, peak - base_mem / 2**30


def measure(config: str, L: int, dtype: torch.dtype, baselines, out_path, rep: int, variants=("auto",)):
    """Measure every variant and the baselines at one (config, length); returns ({variant: row}, baselines)."""
    Hq, Hk, D, K = CONFIGS[config]
    G, S, C = Hq // Hk, CHUNK, L // CHUNK
    dev = DEVICE
    gen, q_r, lmk = retrieval_inputs(config, L, dtype)

    def retrieve():
        return hsa_retrieval(q_r, lmk, chunk_size=S, topk=K)

    retrieve()  # autotune outside the measurements
    base_mem = allocated_bytes()
    retrieval_peak = peak_memory_gib(retrieve) - base_mem / 2**30
    retrieval_ms = bench_ms(retrieve, rep=rep)
    idx, w = retrieve()
    n_valid = int((idx >= 0).sum())
    print(f"  retrieval {config}/{L}: {retrieval_ms:.3f} ms, peak above inputs {retrieval_peak:.4f} GiB", flush=True)
    del q_r, lmk
    q, k, v = attention_inputs(config, L, dtype, gen)
    w = w.detach().requires_grad_()
    flop_fwd = 4.0 * n_valid * G * S * D
    gather_bytes = n_valid * 2 * S * D * q.element_size()
    rows = {}
    for variant in variants:
        try:
            fwd, bwd, peak, peak_above = time_hsa(q, k, v, w, idx, S, variant, rep)
        except Exception as e:  # noqa: BLE001 - report the failure and keep measuring
            print(f"  variant {variant} failed at {config}/{L}: {type(e).__name__}: {e}", flush=True)
            continue
        rows[variant] = dict(
            kernel="hsa_attention", config=config, seq_len=L, dtype=str(dtype).replace("torch.", ""),
            schedule=variant, fwd_ms=fwd, bwd_ms=bwd, fwd_tflops=tflops(flop_fwd, fwd),
            bwd_tflops=tflops(2.5 * flop_fwd, bwd), gather_gbps=gather_bytes / (fwd * 1e-3) / 1e9, peak_gib=peak,
            peak_above_inputs_gib=peak_above, retrieval_ms=retrieval_ms, retrieval_peak_gib=retrieval_peak,
            retrieval_over_fwd=retrieval_ms / fwd, valid_slot_fraction=n_valid / (L * Hk * K),
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    del w
    qd = q.detach().transpose(1, 2).contiguous().requires_grad_()
    kd = k.detach().repeat_interleave(G, dim=2).transpose(1, 2).contiguous().requires_grad_()
    vd = v.detach().repeat_interleave(G, dim=2).transpose(1, 2).contiguous().requires_grad_()
    del q, k, v
    runners = {
        "dense": ("cudnn_dense_causal", lambda: dense_causal(qd, kd, vd)),
        "flex": ("flex_sliding_window", lambda: flex_sliding_window(qd, kd, vd, K * S)),
    }
    results = {}
    for key in baselines:
        name, fn = runners[key]
        try:
            results[name] = fwd_bwd_ms(fn, (qd, kd, vd), rep=rep)
        except Exception as e:  # noqa: BLE001 - report the failure and keep measuring
            print(f"  {name} failed at {config}/{L}: {type(e).__name__}: {e}", flush=True)
            results[name] = None
    for row in rows.values():
        total = row["fwd_ms"] + row["bwd_ms"]
        for name, res in (results or {None: None}).items():
            bf, bb = res if res is not None else (None, None)
            record(
                out_path, **row, baseline=name, baseline_fwd_ms=bf, baseline_bwd_ms=bb,
                speedup_fwd_bwd=((bf + bb) / total) if res is not None else None,
                sliding_window=K * S if name == "flex_sliding_window" else None,
            )
    first = next(iter(rows.values()), None)
    record(
        out_path, kernel="hsa_retrieval", config=config, seq_len=L, dtype=str(dtype).replace("torch.", ""),
        fwd_ms=retrieval_ms, bwd_ms=None, peak_gib=retrieval_peak, baseline="hsa_attention_forward",
        baseline_fwd_ms=None if first is None else first["fwd_ms"], baseline_bwd_ms=None,
    )
    return rows, results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="A,B,C")
    p.add_argument("--seq-lens", default="8192,16384,32768,65536,131072")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--baselines", default="dense,flex", help="comma list of dense, flex (or 'none')")
    p.add_argument("--variants", default="auto", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--sweep", action="store_true", help="only time the SWEEP list of schedules and launch parameters")
    p.add_argument("--gather-roof", action="store_true",
                   help="only time the token forward's chunk loads without the math (its memory floor)")
    p.add_argument("--once", action="store_true",
                   help="with --gather-roof: run each kernel once, untimed (to run under a profiler such as ncu)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rep", type=int, default=100, help="timing budget per measurement, ms")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hsa.jsonl"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("benchmarks/hsa.py needs a CUDA GPU (--smoke runs tiny sizes on CPU to check the script)")
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 64
    baselines = [b for b in args.baselines.split(",") if b and b != "none"]
    variants = [x for x in args.variants.split(",") if x]
    unknown = [x for x in variants if x not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.gather_roof:
        for config in args.configs.split(","):
            for L in (int(x) for x in args.seq_lens.split(",")):
                gather_roof(config, L, DTYPES[args.dtype], min(args.rep, 50), args.once)
        return
    if args.sweep:
        for config in args.configs.split(","):
            for L in (int(x) for x in args.seq_lens.split(",")):
                sweep(config, L, DTYPES[args.dtype], min(args.rep, 50))
        return
    table = []
    # length-major, so that a time limit cuts the longest runs, not a whole config
    for L in (int(x) for x in args.seq_lens.split(",")):
        for config in args.configs.split(","):
            try:
                rows, res = measure(config, L, DTYPES[args.dtype], baselines, args.out, args.rep, variants)
            except Exception as e:  # noqa: BLE001 - one failed size must not lose the others
                print(f"{config}/{L} failed: {type(e).__name__}: {e}", flush=True)
                continue
            dense, flex = res.get("cudnn_dense_causal"), res.get("flex_sliding_window")
            for variant, row in rows.items():
                total = row["fwd_ms"] + row["bwd_ms"]
                table.append(dict(
                    cfg=config, L=L, variant=variant, fwd_ms=row["fwd_ms"], bwd_ms=row["bwd_ms"],
                    bwd_fwd=row["bwd_ms"] / row["fwd_ms"], fwd_TF=row["fwd_tflops"], bwd_TF=row["bwd_tflops"],
                    gather_GBs=row["gather_gbps"], peak_GiB=row["peak_gib"], retr_ms=row["retrieval_ms"],
                    retr_fwd=row["retrieval_over_fwd"], retr_GiB=row["retrieval_peak_gib"],
                    dense_ms=None if dense is None else sum(dense),
                    x_dense=None if dense is None else sum(dense) / total,
                    swa_ms=None if flex is None else sum(flex),
                    x_swa=None if flex is None else sum(flex) / total,
                ))
                print(format_table(table[-1:], list(table[-1])), flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if table:
        print()
        print(format_table(table, list(table[0])))


if __name__ == "__main__":
    main()
