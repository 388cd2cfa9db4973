"""Timing and recording helpers shared by the kernel benchmarks (``benchmarks/<family>.py``).

API (kept stable for every family):
- ``bench_ms(fn, warmup=25, rep=100) -> float``: median milliseconds of ``fn()`` with CUDA events.
- ``fwd_bwd_ms(forward, backward_grads) -> (fwd_ms, bwd_ms)``: backward = (fwd + bwd) - fwd.
- ``peak_memory_gib(fn) -> float``: peak allocated GiB while running ``fn()`` once.
- ``environment() -> dict``: gpu, torch, triton, date, command.
- ``record(path, **fields)``: append one JSON object (fields + environment) to a ``.jsonl`` file.
- ``format_table(rows, columns) -> str``: a fixed-width text table.
- ``profile_one_step(step, path)``: one step under torch.profiler: kernels by time and time by kind of work.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shlex
import statistics
import sys
from typing import Callable, Iterable, Sequence

import torch

__all__ = ["bench_ms", "fwd_bwd_ms", "peak_memory_gib", "environment", "record", "format_table", "tflops",
           "profile_one_step", "profile_categories"]


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn()`` in ms (CUDA events; wall clock on CPU). ``warmup``/``rep`` are in milliseconds."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import time

    fn()
    times = []
    end = time.perf_counter() + rep / 1000.0
    while True:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
        if time.perf_counter() > end:
            break
    return statistics.median(times)


def fwd_bwd_ms(
    forward: Callable[[], torch.Tensor], grad_inputs: Sequence[torch.Tensor], warmup: int = 25, rep: int = 100
) -> tuple[float, float]:
    """(forward ms, backward ms); backward = median(fwd + bwd) - median(fwd).

    ``forward()`` must return a tensor built from ``grad_inputs`` (which require grad); a fixed random cotangent is
    used for the backward. The forward is timed as a training step runs it, with autograd on (its graph dropped
    unused): a kernel may pick another algorithm, or save more, when no backward can follow, and the backward is
    the difference of the two timings only if both run the same forward.
    """
    out = forward()
    cotangent = torch.randn_like(out)

    def fwd_only():
        forward()

    def fwd_and_bwd():
        for t in grad_inputs:
            t.grad = None
        forward().backward(cotangent)

    f = bench_ms(fwd_only, warmup, rep)
    fb = bench_ms(fwd_and_bwd, warmup, rep)
    return f, max(fb - f, 0.0)


def peak_memory_gib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated while running ``fn()`` once, in GiB (NaN without CUDA)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


# Kernel (or, without CUDA, operator) names -> the kind of work, first match wins: the summary line of
# profile_one_step. Lower-case substrings.
PROFILE_CATEGORIES = [
    ("hsa/gca kernels", ("_hsa_", "_topk_chunks", "_slot_sum", "_gca_", "selectedscores")),
    ("fused norm/rope/loss", ("_rms_norm", "_rotary", "_cross_entropy")),
    # inductor's templates ("triton_tem_*") are FlexAttention's kernels in these models
    ("attention (flex/sdpa)", ("flex", "flash", "fmha", "attention", "sdpa", "cudnn", "triton_tem")),
    ("matmul", ("gemm", "matmul", "nvjet", "xmma", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "_grouped_mm")),
    ("compiled element-wise", ("triton_",)),
    ("copies", ("copy", "cat", "memcpy", "memset", "contiguous", "index", "gather", "scatter")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("communication", ("nccl", "gloo", "allreduce", "all_reduce", "reduce_scatter", "allgather")),
]


def profile_categories(events, cuda: bool) -> dict[str, float]:
    """Self time (ms) of the profiled kernels (CPU operators without CUDA) per PROFILE_CATEGORIES kind, the rest as
    'other element-wise'."""
    totals: dict[str, float] = {}
    for e in events:
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        name = e.key.lower()
        kind = next((k for k, keys in PROFILE_CATEGORIES if any(x in name for x in keys)), "other element-wise")
        totals[kind] = totals.get(kind, 0.0) + us / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile_one_step(step: Callable[[], object], path: str, rows: int = 45) -> str:
    """Run ``step`` once under torch.profiler; write and print its operators and kernels by GPU time (CPU time
    without CUDA), headed by the step's wall time, the summed kernel time (their gap is time the GPU waited for
    the host: launch-bound code) and that time by kind of work (``PROFILE_CATEGORIES``). Returns the text."""
    import time

    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    kinds = profile_categories(events, cuda)
    total = sum(kinds.values()) or 1.0
    summary = f"profiled step: wall {wall_ms:.1f} ms (under the profiler)"
    if cuda:  # kernels only: operators report their kernels' time as well
        summary += f", summed kernel time {total:.1f} ms"
    summary += "\nby kind: " + ", ".join(f"{k} {ms:.1f} ms ({100 * ms / total:.0f}%)" for k, ms in kinds.items())
    text = summary + "\n" + events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                         row_limit=rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text, flush=True)
    return text


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
    }


def record(path: str, **fields) -> dict:
    """Append one JSON object (``fields`` plus the environment, fields win) as a line of ``path``."""
    row = {**environment(), **fields}
    # strict JSON: NaN / inf become null
    row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=False) + "\n")
    return row


def format_table(rows: Iterable[dict], columns: Sequence[str]) -> str:
    rows = list(rows)

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
