"""GCA kernel benchmark: Triton forward / backward against cuDNN dense causal attention (SDPA), same run.

    python benchmarks/gca.py            # every config, 8K..128K, bf16; appends to benchmarks/results/gca.jsonl
    python benchmarks/gca.py --configs hq16-d128 --seq-lens 65536 --no-record

Selections come from `gca_retrieval` on random landmarks (Gumbel on, as in training), shifted to query chunks, so
they are causal and roughly uniform over the past. Effective TFLOP/s count only valid selected slots:
forward 4 * Hq * S * D per (token, valid slot), backward 2.5x that (FlashAttention convention). The dense
baseline is torch SDPA restricted to the cuDNN backend, causal, on [B, Hq, L, D] (FLOPs 2 * L^2 * Hq * D forward).
`--sweep` times each kernel alone over a few launch configurations first (tuning; printed, not recorded).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, format_table, fwd_bwd_ms, peak_memory_gib, record, tflops  # noqa: E402
from megatron_ext.kernels.gca import gca_attention, gca_retrieval, selection_for_query_chunks  # noqa: E402

# name: (Hq, Hk, D, chunk, topk)
CONFIGS = {
    "drt": (12, 12, 64, 64, 8),  # the DRT model: 12 heads MHA, d 64, chunk 64, top-8
    "hq16-d128": (16, 16, 128, 64, 8),  # MHA, as DRT's chunk K/V projections
    "hq16-hk4-d128": (16, 4, 128, 64, 8),  # G = 4, the ratio of the public GCA kernel test
}
DEFAULT_SEQ_LENS = (8192, 16384, 32768, 65536, 131072)
H100_BF16_PEAK = 989.0
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gca.jsonl")


def make_inputs(L, Hq, Hk, D, S, K, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, L, Hq, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, L, Hk, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, L, Hk, D, device=device, dtype=dtype, generator=gen)
    C = -(-L // S)
    landmarks = torch.randn(1, C, 64, device=device, generator=gen)
    qlm = torch.randn(1, C, 64, device=device, generator=gen)
    idx, w = gca_retrieval(qlm, landmarks, topk=K, gumbel=True, generator=gen)
    idx, w = selection_for_query_chunks(idx, w)
    return q, k, v, w.contiguous(), idx.contiguous()


def valid_token_slots(idx, L, S):
    tokens_per_chunk = torch.full((idx.shape[1],), S, device=idx.device)
    tokens_per_chunk[-1] = L - S * (idx.shape[1] - 1)
    return int(((idx[0] >= 0).sum(-1) * tokens_per_chunk).sum())


def bench_gca(L, Hq, Hk, D, S, K, dtype, device):
    q, k, v, w, idx = make_inputs(L, Hq, Hk, D, S, K, dtype, device)
    for t in (q, k, v, w):
        t.requires_grad_()
    fwd = lambda: gca_attention(q, k, v, w, idx, chunk_size=S)  # noqa: E731
    fwd_ms, bwd_ms = fwd_bwd_ms(fwd, [q, k, v, w])
    flop = 4.0 * Hq * S * D * valid_token_slots(idx, L, S)
    # Bytes the forward gathers: K and V of every valid (query chunk, KV head, slot), plus q and o once.
    gathered = int((idx[0] >= 0).sum()) * Hk * S * D * 2 * q.element_size() + 2 * q.numel() * q.element_size()

    def step():
        for t in (q, k, v, w):
            t.grad = None
        fwd().backward(torch.ones_like(q))

    mem = peak_memory_gib(step)
    return dict(fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=tflops(flop, fwd_ms), bwd_tflops=tflops(2.5 * flop, bwd_ms),
                fwd_gbps=gathered / (fwd_ms * 1e-3) / 1e9 if fwd_ms > 0 else float("nan"), peak_gib=mem)


def bench_sdpa(L, Hq, D, dtype, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, Hq, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    fwd_ms, bwd_ms = fwd_bwd_ms(fwd, [q, k, v])
    flop = 2.0 * L * L * Hq * D
    return dict(fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=tflops(flop, fwd_ms), bwd_tflops=tflops(2.5 * flop, bwd_ms))


def sweep(L, Hq, Hk, D, S, K, dtype, device, budget_s):
    """Time each kernel alone over launch configurations (GCA_<KERNEL>_CONFIG); print the table, return the best."""
    from megatron_ext.kernels.gca import triton_attention as ta

    q, k, v, w, idx = make_inputs(L, Hq, Hk, D, S, K, dtype, device)
    idx = idx.to(torch.int32)
    scale = D ** -0.5
    o, lse = ta.gca_attention_forward(q, k, v, w, idx, chunk_size=S, sm_scale=scale, softmax_off_by_one=False,
                                      landmark_null_slot=False)
    do = torch.randn_like(o)
    flop = 4.0 * Hq * S * D * valid_token_slots(idx, L, S)
    rows_per_chunk = S * (Hq // Hk)
    grid = [f"{bm},{wp},{st}" for bm, wp, st in itertools.product((64, 128), (4, 8), (2, 3))
            if bm <= max(64, rows_per_chunk)]
    best, rows, t0 = {}, [], time.time()
    # "fused" = the one-kernel backward (dK/dV + atomic dQ), tuned through the dK/dV launch config.
    for kernel in ("fwd", "dq", "dkdv", "fused"):
        env_key = "GCA_DKDV_CONFIG" if kernel == "fused" else f"GCA_{kernel.upper()}_CONFIG"
        for cfg in grid:
            if time.time() - t0 > budget_s:
                break
            os.environ[env_key] = cfg
            if kernel == "fused":
                os.environ["GCA_BWD"] = "fused"
            try:
                if kernel == "fwd":
                    fn = lambda: ta.gca_attention_forward(  # noqa: E731
                        q, k, v, w, idx, chunk_size=S, sm_scale=scale, softmax_off_by_one=False,
                        landmark_null_slot=False)
                else:
                    fn = lambda: ta.gca_attention_backward(  # noqa: E731
                        do, q, k, v, w, idx, lse, chunk_size=S, sm_scale=scale, softmax_off_by_one=False,
                        landmark_null_slot=False, only=None if kernel == "fused" else kernel)
                ms = bench_ms(fn, warmup=10, rep=40)
            except Exception as exc:  # a config that does not compile (shared memory) is skipped
                rows.append(dict(kernel=kernel, cfg=cfg, ms=float("nan"), note=type(exc).__name__))
                continue
            finally:
                os.environ.pop(env_key, None)
                os.environ.pop("GCA_BWD", None)
            dots = {"fwd": 2, "dq": 3, "dkdv": 4, "fused": 5}[kernel]
            rows.append(dict(kernel=kernel, cfg=cfg, ms=ms, actual_tflops=tflops(flop * dots / 2, ms)))
            if kernel not in best or ms < best[kernel][1]:
                best[kernel] = (cfg, ms)
    print(format_table(rows, ["kernel", "cfg", "ms", "actual_tflops", "note"]), flush=True)
    split_ms = best.get("dq", ("", float("inf")))[1] + best.get("dkdv", ("", float("inf")))[1]
    fused_ms = best.get("fused", ("", float("inf")))[1]
    print(f"backward: split {split_ms:.3f} ms, fused {fused_ms:.3f} ms", flush=True)
    chosen = {kname: cfg for kname, (cfg, _) in best.items() if kname != "fused"}
    if fused_ms < split_ms:
        chosen["dkdv"] = best["fused"][0]
        chosen["bwd"] = "fused"
    return chosen


def profile(L, Hq, Hk, D, S, K, dtype, device):
    """Where the time of one forward+backward goes at a small size: kernel table and host time per step."""
    q, k, v, w, idx = make_inputs(L, Hq, Hk, D, S, K, dtype, device)
    for t in (q, k, v, w):
        t.requires_grad_()
    do = torch.randn_like(q)

    def step():
        gca_attention(q, k, v, w, idx, chunk_size=S).backward(do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    host_ms = (time.perf_counter() - t0) / 20 * 1e3  # launch-bound if close to the timed step
    torch.cuda.synchronize()
    synced_ms = (time.perf_counter() - t0) / 20 * 1e3
    print(f"profile L={L}: host time per fwd+bwd {host_ms:.3f} ms, with sync {synced_ms:.3f} ms", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated among {list(CONFIGS)}")
    parser.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_SEQ_LENS)))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--no-baseline", action="store_true", help="skip the SDPA cuDNN dense causal baseline")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to the JSONL")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--sweep", default=None, metavar="CONFIG:SEQ_LEN",
                        help="tune launch configs on one shape first and use the best ones for the run")
    parser.add_argument("--sweep-budget-s", type=float, default=90.0)
    parser.add_argument("--profile", default=None, metavar="CONFIG:SEQ_LEN",
                        help="print a profile of one forward+backward first")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gca.py needs a CUDA GPU")
    device = "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    if args.profile:
        name, seq = args.profile.split(":")
        Hq, Hk, D, S, K = CONFIGS[name]
        profile(int(seq), Hq, Hk, D, S, K, dtype, device)

    tuned = {}
    if args.sweep:
        name, seq = args.sweep.split(":")
        Hq, Hk, D, S, K = CONFIGS[name]
        tuned = sweep(int(seq), Hq, Hk, D, S, K, dtype, device, args.sweep_budget_s)
        print("best launch configs:", tuned, flush=True)
        for kernel, cfg in tuned.items():
            if kernel == "bwd":
                os.environ["GCA_BWD"] = cfg
            else:
                os.environ[f"GCA_{kernel.upper()}_CONFIG"] = cfg

    rows, baselines = [], {}
    for name in args.configs.split(","):
        Hq, Hk, D, S, K = CONFIGS[name]
        for L in (int(x) for x in args.seq_lens.split(",")):
            r = bench_gca(L, Hq, Hk, D, S, K, dtype, device)
            if not args.no_baseline and (L, Hq, D) not in baselines:
                try:
                    baselines[(L, Hq, D)] = bench_sdpa(L, Hq, D, dtype, device)
                except RuntimeError as exc:  # e.g. no cuDNN attention for this shape: recorded as missing
                    print(f"SDPA cuDNN baseline failed at L={L}, Hq={Hq}, D={D}: {exc}", flush=True)
                    baselines[(L, Hq, D)] = None
            base = baselines.get((L, Hq, D))
            row = dict(
                kernel="gca_triton", config=name, seq_len=L, dtype=args.dtype,
                fwd_ms=round(r["fwd_ms"], 4), bwd_ms=round(r["bwd_ms"], 4),
                baseline="sdpa_cudnn_causal" if base else None,
                baseline_fwd_ms=round(base["fwd_ms"], 4) if base else None,
                baseline_bwd_ms=round(base["bwd_ms"], 4) if base else None,
                hq=Hq, hk=Hk, head_dim=D, chunk_size=S, topk=K,
                fwd_tflops=round(r["fwd_tflops"], 1), bwd_tflops=round(r["bwd_tflops"], 1),
                fwd_pct_peak=round(100 * r["fwd_tflops"] / H100_BF16_PEAK, 1),
                fwd_gather_gbps=round(r["fwd_gbps"], 0), peak_gib=round(r["peak_gib"], 2),
                speedup_vs_baseline=(round((base["fwd_ms"] + base["bwd_ms"]) / (r["fwd_ms"] + r["bwd_ms"]), 2)
                                     if base else None),
                baseline_fwd_tflops=round(base["fwd_tflops"], 1) if base else None,
                baseline_bwd_tflops=round(base["bwd_tflops"], 1) if base else None,
                launch_configs={**{kname: os.environ.get(f"GCA_{kname.upper()}_CONFIG", "default")
                                   for kname in ("fwd", "dq", "dkdv")},
                                "bwd": os.environ.get("GCA_BWD", "split")},
            )
            if not args.no_record:
                row = record(args.out, **row)
            rows.append(row)
            print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    table = format_table(rows, COLUMNS)
    print(table)
    if args.markdown:
        write_markdown(args.markdown, rows)


COLUMNS = ["config", "seq_len", "fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops", "fwd_gather_gbps", "peak_gib",
           "baseline_fwd_ms", "baseline_bwd_ms", "speedup_vs_baseline"]


def write_markdown(path, rows):
    env = rows[0]
    lines = [
        f"GPU {env.get('gpu')}, torch {env.get('torch')}, Triton {env.get('triton')}, {env.get('date')}, "
        f"`{env.get('command')}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
