"""End-to-end training throughput of ``pretrain_hsa.py``: SWA+HSA-345M against SWA-only and dense GPTs of its size.

Each model trains ``--train-iters`` iterations (default 50) through the full production path: megatron's training
loop, bf16 (Float16Module), Megatron DDP + distributed optimizer, warm-up + cosine LR, mock data of
``--seq-length`` tokens (default 8K), ``--micro-batch-size`` (default 1) with gradient accumulation to
``--global-batch-size``; ``--extra`` appends arguments for all three models (e.g.
``--extra="--cross-entropy-loss-fusion"``). The three models run one after another in this one invocation (same GPU, same software), each in its own process. Throughput is the median over the log
intervals after ``--skip-iters`` (compilation and warm-up excluded) of pretrain_hsa's ``[perf]`` line: tokens/s,
TFLOP/s per GPU from ``megatron_ext.training.flops`` (SWA, HSA and MoE counted as built) and MFU against the H100's
989 dense bf16 TFLOP/s.

    python benchmarks/train.py --out benchmarks/results/train.jsonl --markdown benchmarks/results/train.md
    python benchmarks/train.py --smoke          # tiny sizes, 4 iterations: checks the script on a CPU
    python benchmarks/train.py --seq-length 65536 --global-batch-size 2 \
        --extra="--recompute-granularity selective --recompute-modules core_attn mlp"   # 64K on one 80 GB GPU
    python benchmarks/train.py --models swa_hsa_345m,swa_hsa_345m_unfused,gpt_345m_swa,gpt_345m_swa_unfused \
        --micro-batch-size 2 --global-batch-size 8   # the fused kernels' effect, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = [  # (name, label, config[, extra pretrain_hsa.py arguments])
    ("swa_hsa_345m", "SWA+HSA-345M (swa*8 [hsa swa*4]*2)", "examples/swa_hsa_345m.yaml"),
    ("gpt_345m_swa", "GPT-345M SWA-only (W=512, swa*18)", "examples/gpt_345m_swa.yaml"),
    ("gpt_345m_full", "GPT-345M dense causal (full*18)", "examples/gpt_345m_full.yaml"),
    # Not run by default: the 16-layer SWA-only baseline that runs 1-6 compared against (the SWA+HSA model had 16
    # layers then, `swa*8 [hsa swa*3]*2`)
    ("gpt_345m_swa_16", "GPT-345M SWA-only (W=512, swa*16)", "examples/gpt_345m_swa.yaml",
     ["--num-layers", "16", "--layer-pattern", "swa*16"]),
    # Not run by default: the models without the fused RMSNorm / RoPE / cross entropy (megatron's own code), to
    # measure what those kernels give in the same invocation (--models swa_hsa_345m,swa_hsa_345m_unfused,...).
    ("swa_hsa_345m_unfused", "SWA+HSA-345M, megatron's norms/RoPE/loss", "examples/swa_hsa_345m.yaml",
     ["--fused-kernel-backend", "reference"]),
    # Not run by default: DRT-128M, the GCA model (mock data has no landmark tokens: each chunk's last token plays
    # the landmark's part)
    ("drt_128m", "DRT-128M (swa*6 [gca*6])", "examples/drt_128m.yaml"),
    ("gpt_345m_swa_unfused", "GPT-345M SWA-only, megatron's norms/RoPE/loss", "examples/gpt_345m_swa.yaml",
     ["--fused-kernel-backend", "reference"]),
]
DEFAULT_MODELS = "swa_hsa_345m,gpt_345m_swa,gpt_345m_full"
SMOKE_OVERRIDES = ["--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
                   "--seq-length", "256", "--max-position-embeddings", "256", "--swa-window-size", "32",
                   "--hsa-chunk-size", "16", "--hsa-topk", "2", "--hsa-inner-window-size", "32",
                   "--hsa-retrieval-dim", "64", "--vocab-size", "512", "--hsa-kernel-backend", "reference"]

_PERF = re.compile(r"\[perf\] iteration\s+(\d+) \| tokens/s: ([0-9,]+) \| TFLOP/s/GPU: ([0-9.]+) \|"
                   r"(?: MFU: ([0-9.]+)% \|)?(?: max memory: ([0-9.]+) GiB \|)?")
_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+) \|.*?"
                   r"lm loss: ([0-9.E+-]+)")


def train_args(config: str, args, extra: list[str] = ()) -> list[str]:
    cmd = ["--config", config, "--train-iters", str(args.train_iters), "--micro-batch-size", str(args.micro_batch_size),
           "--global-batch-size", str(args.global_batch_size), "--lr", "2e-3", "--min-lr", "2e-4",
           "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, min(5, args.train_iters // 4))), "--weight-decay", "1e-3", "--clip-grad", "1.0",
           "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--use-distributed-optimizer", "--mock-data",
           "--tokenizer-type", "NullTokenizer", "--log-interval", str(args.log_interval), "--log-throughput",
           "--eval-iters", "0", "--eval-interval", "1000000", "--seed", "1234",
           # the papers' recipe has no dropout (and FlexAttention, the SWA path on GPUs, has no attention dropout)
           "--attention-dropout", "0.0", "--hidden-dropout", "0.0"]
    cmd += args.extra.split() + list(extra)
    if args.smoke:
        cmd += SMOKE_OVERRIDES
    else:
        cmd += ["--bf16", "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length)]
    return cmd


def run_model(name: str, config: str, args, log_dir: str, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "pretrain_hsa.py"), *train_args(config, args, extra)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = os.path.join(log_dir, f"train_{name}.log")
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=args.timeout_per_model)
    text = open(log_path).read()
    row = {"model": name, "config": config, "returncode": proc.returncode, "wall_s": round(time.time() - started, 1),
           "log": os.path.relpath(log_path, REPO) if log_path.startswith(REPO) else log_path,
           "command": "python pretrain_hsa.py " + " ".join(cmd[2:])}
    perf = [m for m in _PERF.finditer(text) if int(m.group(1)) > args.skip_iters]
    losses = {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in _LOSS.finditer(text)}
    if proc.returncode != 0 or not perf:
        row["error"] = text[-3000:]
        return row
    row.update(
        iterations=max(losses) if losses else None,
        tokens_per_s=statistics.median(float(m.group(2).replace(",", "")) for m in perf),
        tflops_per_gpu=statistics.median(float(m.group(3)) for m in perf),
        mfu=(statistics.median(float(m.group(4)) for m in perf) / 100) if perf[0].group(4) else None,
        max_memory_gib=max((float(m.group(5)) for m in perf if m.group(5)), default=None),
        iteration_ms=statistics.median(ms for it, (ms, _) in losses.items() if it > args.skip_iters),
        first_loss=losses[min(losses)][1], last_loss=losses[max(losses)][1],
    )
    return row


def environment() -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
            "bench_command": "python benchmarks/train.py " + " ".join(sys.argv[1:])}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return info


def markdown(rows: list[dict], env: dict, args) -> str:
    lines = [f"## {env['date'][:10]}, {env['device']}, torch {env['torch']}, Triton {env.get('triton', '-')}", "",
             f"Command: `{env['bench_command']}`", "",
             f"{args.train_iters} iterations, {args.seq_length} tokens x global batch {args.global_batch_size} "
             f"(micro-batch {args.micro_batch_size}), bf16, distributed optimizer; medians over iterations > "
             f"{args.skip_iters}.", "",
             "| model | iterations | iteration ms | tokens/s | TFLOP/s/GPU | MFU | max GiB | loss first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed (rc {r['returncode']}) | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['max_memory_gib']:.1f}" if r.get("max_memory_gib") else "-"
        lines.append(f"| {r['label']} | {r['iterations']} | {r['iteration_ms']:.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops_per_gpu']:.1f} | {mfu} | {mem} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    by = {r["model"]: r for r in rows if "error" not in r}
    if "swa_hsa_345m" in by and "gpt_345m_swa" in by:
        ratio = by["swa_hsa_345m"]["tokens_per_s"] / by["gpt_345m_swa"]["tokens_per_s"]
        mfu = by["swa_hsa_345m"].get("mfu")
        lines += ["", f"SWA+HSA / SWA-only tokens/s: **{ratio:.3f}** (bar: >= 0.85, "
                      f"{'met' if ratio >= 0.85 else 'NOT met'}); SWA+HSA MFU: **"
                      f"{'-' if mfu is None else f'{100 * mfu:.1f}%'}** (bar: >= 30%, "
                      f"{'met' if mfu is not None and mfu >= 0.30 else 'NOT met'})."]
    if "swa_hsa_345m" in by and "gpt_345m_swa_16" in by:
        ratio = by["swa_hsa_345m"]["tokens_per_s"] / by["gpt_345m_swa_16"]["tokens_per_s"]
        lines += ["", f"SWA+HSA / 16-layer SWA-only tokens/s (two layers fewer than SWA+HSA-345M): {ratio:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list of {', '.join(m[0] for m in MODELS)}")
    parser.add_argument("--train-iters", type=int, default=50)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--extra", default="", help="more pretrain_hsa.py arguments for every model (one string)")
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--skip-iters", type=int, default=10, help="iterations left out of the medians")
    parser.add_argument("--timeout-per-model", type=float, default=600)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 4 iterations (checks the script)")
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--out", default=None, help="append one JSON row per model")
    parser.add_argument("--markdown", default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    known = [m[0] for m in MODELS]
    wanted = [name for name in args.models.split(",") if name]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:  # a typo would otherwise run nothing and report success
        parser.error(f"--models: unknown model(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(known)}")
    if args.smoke:
        args.train_iters, args.log_interval, args.skip_iters = 4, 1, 1
    log_dir = args.log_dir or os.path.join(REPO, "outputs", "bench_train")
    os.makedirs(log_dir, exist_ok=True)
    env = environment()
    rows = []
    for name, label, config, *extra in MODELS:
        if name not in wanted:
            continue
        row = run_model(name, config, args, log_dir, *extra)
        row["label"] = label
        rows.append(row)
        summary = {k: row.get(k) for k in ("model", "returncode", "wall_s", "iterations", "iteration_ms",
                                           "tokens_per_s", "tflops_per_gpu", "mfu", "max_memory_gib", "last_loss")}
        print(json.dumps(summary), flush=True)
        if "error" in row:
            print(row["error"][-2000:], flush=True)
    text = markdown(rows, env, args)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**env, "bench": "train", "train_iters": args.train_iters,
                                    "seq_length": args.seq_length, "global_batch_size": args.global_batch_size,
                                    "micro_batch_size": args.micro_batch_size, **{k: v for k, v in row.items() if k != 'error'},
                                    "failed": "error" in row}) + "\n")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    failed = [row["model"] for row in rows if "error" in row]
    if failed:  # the table is written either way; the status tells a script (or SLURM) that a run failed
        print(f"benchmarks/train.py: failed: {', '.join(failed)} (logs in {log_dir})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
