"""Preprocessing throughput: tools/preprocess_data.py against a plain single-process loop, on CPU.

The baseline is the simplest correct program: read each line, ``json.loads``, ``tokenizer.tokenize``, append EOD,
``IndexedDatasetBuilder.add_document``, ``finalize`` (same tokenizer, same megatron-core builder, same input).
Every run of ours must write files byte-identical to the baseline's (checked), so the numbers compare like with
like. Each configuration runs ``--repeat`` times and the fastest is kept (the machine may be shared). CPU time
(user + system, this process and its worker processes) is reported too: on a loaded machine, tokens per
CPU-second is the steadier measure of the work each process does.

    python benchmarks/preprocess_data.py --mb 20 --workers 1 2 --repeat 3

Appends one JSON line per configuration to benchmarks/results/preprocess_data.jsonl and writes a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron_ext.data.corpus import TOKENIZER_MODEL  # noqa: E402
from megatron_ext.data.preprocess import PreprocessOptions, dataset_prefix, preprocess  # noqa: E402
from megatron_ext.data.tokenizers import TokenizerSpec, train_byte_level_bpe  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_input(path: str, megabytes: float) -> None:
    from megatron_ext.data.corpus.generate import generate_documents

    docs = generate_documents(max(1, int(megabytes * 1e6 / 730)), seed=7)  # ~730 bytes per record
    with open(path, "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def baseline(path: str, spec: TokenizerSpec, prefix: str) -> tuple[float, float, int]:
    """The plain loop. Returns (wall seconds, CPU seconds, tokens)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    cpu0, start = cpu_seconds(), time.perf_counter()
    tok = spec.build()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    tokens = 0
    with open(path, "rb") as f:
        for line in f:
            ids = tok.tokenize(json.loads(line)["text"])
            ids.append(tok.eod)
            builder.add_document(np.array(ids), [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return time.perf_counter() - start, cpu_seconds() - cpu0, tokens


def files_equal(a: str, b: str) -> bool:
    return all(open(a + s, "rb").read() == open(b + s, "rb").read() for s in (".bin", ".idx"))


def environment() -> dict:
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import sentencepiece

    return {
        "device": f"CPU: {cpu}, {os.cpu_count()} cores", "python": platform.python_version(),
        "numpy": np.__version__, "sentencepiece": sentencepiece.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None, help="a JSONL file with a 'text' key (default: generated)")
    parser.add_argument("--mb", type=float, default=20.0, help="size of the generated input")
    parser.add_argument("--tokenizers", nargs="+", default=["bytelevel", "sentencepiece", "gpt2bpe"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="preprocess_bench_")
    path = args.input or os.path.join(work, "input.jsonl")
    if not args.input:
        make_input(path, args.mb)
    megabytes = os.path.getsize(path) / 1e6
    specs = {
        "bytelevel": TokenizerSpec("ByteLevelTokenizer"),
        "sentencepiece": TokenizerSpec("SentencePieceTokenizer", tokenizer_model=TOKENIZER_MODEL),
    }
    if "gpt2bpe" in args.tokenizers:
        with open(path) as f:
            sample = [json.loads(next(f))["text"] for _ in range(300)]
        vocab, merges = os.path.join(work, "vocab.json"), os.path.join(work, "merges.txt")
        train_byte_level_bpe(sample, 500, vocab, merges)
        specs["gpt2bpe"] = TokenizerSpec("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)

    env = environment()
    rows = []
    for name in args.tokenizers:
        spec = specs[name]
        base_prefix = os.path.join(work, f"{name}_baseline")
        base_s, base_cpu, tokens = min(baseline(path, spec, base_prefix) for _ in range(args.repeat))
        rows.append(dict(tokenizer=name, method="plain loop", workers=1, seconds=base_s, cpu_seconds=base_cpu,
                         tokens=tokens, identical=True))
        for workers in args.workers:
            runs = []
            for _ in range(args.repeat):
                out = os.path.join(work, f"{name}_w{workers}")
                cpu0, t0 = cpu_seconds(), time.perf_counter()
                preprocess(PreprocessOptions(inputs=[path], output_prefix=out, tokenizer=spec, append_eod=True,
                                             workers=workers, log_interval=0), log=lambda m: None)
                runs.append((time.perf_counter() - t0, cpu_seconds() - cpu0))
            same = files_equal(dataset_prefix(out, "text"), base_prefix)
            wall, cpu = min(runs)
            rows.append(dict(tokenizer=name, method="preprocess_data.py", workers=workers, seconds=wall,
                             cpu_seconds=cpu, tokens=tokens, identical=same))
        for row in rows:
            if row["tokenizer"] == name:
                row["tokens_per_s"] = row["tokens"] / row["seconds"]
                row["tokens_per_s_per_worker"] = row["tokens_per_s"] / row["workers"]
                row["mb_per_s"] = megabytes / row["seconds"]
                row["speedup_vs_plain"] = base_s / row["seconds"]
                row["tokens_per_cpu_s"] = row["tokens"] / row["cpu_seconds"]

    header = ("| tokenizer | method | workers | tokens/s (wall) | tokens/s per worker | MB/s | vs plain loop "
              "| tokens per CPU-second (all processes) | identical bytes |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['tokenizer']} | {r['method']} | {r['workers']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s_per_worker']:,.0f} | {r['mb_per_s']:.2f} | {r['speedup_vs_plain']:.2f}x | "
                     f"{r['tokens_per_cpu_s']:,.0f} | {'yes' if r['identical'] else 'NO'} |")
    table = "\n".join(lines)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"input: {megabytes:.1f} MB, {env['device']}, load average {load}")
    print(table)
    if not args.no_record:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "preprocess_data.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps({**env, "input_mb": round(megabytes, 2), "load_average": load,
                                    **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}})
                        + "\n")
        with open(os.path.join(RESULTS, "preprocess_data.md"), "w") as f:
            f.write(f"# Preprocessing throughput\n\n{env['device']}; input {megabytes:.1f} MB of JSONL; "
                    f"{env['date']}; load average {load}.\n\n`{env['command']}`\n\n{table}\n")
    if not all(r["identical"] for r in rows):
        raise SystemExit("output differs from the plain loop's")


if __name__ == "__main__":
    main()
