"""JSONL -> megatron-core indexed datasets (``.bin``/``.idx``), fast, deterministic and safe to interrupt.

Pipeline: the main process reads input lines in batches (``documents.read_line_batches``), a pool of worker
processes validates and tokenizes the batches (``documents.tokenize_batch``), and the main process takes the
results back *in input order* and writes them with megatron-core's ``IndexedDatasetBuilder``. Because each
batch's output depends on its lines alone and results are written in order, the files are byte-identical for
any ``--workers``.

``--partitions N`` splits the input files into N contiguous groups (balanced by size). Each group is written to a
partial dataset that is finalized on its own with a stamp recording its inputs; a rerun after an interruption
reuses finished partitions whose stamp (size and mtime of the inputs and tokenizer files, options) still matches.
The partials are then merged (``add_index``) in order.

Safety: datasets are written under ``*.bin.tmp``/``*.idx.tmp`` names and renamed at the end, ``.bin`` before
``.idx`` (an old ``.idx`` is removed first; see ``indexed.py``), so an interrupted run never leaves an ``.idx``
that looks complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from megatron_ext.data.documents import (
    BadInputLog,
    BatchResult,
    InputError,
    expand_inputs,
    init_worker,
    read_line_batches,
    worker_tokenize,
)
from megatron_ext.data.indexed import AtomicDatasetWriter
from megatron_ext.data.tokenizers import TokenizerSpec

REPORT_SUFFIX = "_preprocess_report.json"


@dataclass
class PreprocessOptions:
    """The options of tools/preprocess_data.py (Megatron-LM flag names in brackets)."""

    inputs: List[str]  # [--input] files, directories or globs; .gz/.bz2/.xz, and .zst with `zstandard`
    output_prefix: str  # [--output-prefix]; writes {prefix}_{key}_document.{bin,idx}
    tokenizer: TokenizerSpec  # [--tokenizer-type, --tokenizer-model, --vocab-file, --merge-file]
    json_keys: List[str] = field(default_factory=lambda: ["text"])  # [--json-keys]
    append_eod: bool = False  # [--append-eod]
    workers: int = 1  # [--workers]
    partitions: int = 1  # [--partitions]
    log_interval: int = 1000  # [--log-interval] documents between progress lines
    on_error: str = "skip"  # skip: count, report and leave out bad documents; fail: stop at the first one
    max_line_bytes: int = 64 << 20  # longer lines are skipped without being held in memory
    error_samples: int = 5  # file:line samples kept per kind of bad input
    batch_bytes: int = 1 << 20  # input bytes per work unit sent to a worker
    keep_partitions: bool = False  # keep the partials as separate datasets (no merge); write a --data-path list

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"--on-error must be 'skip' or 'fail'; got {self.on_error!r}")
        if self.workers < 1 or self.partitions < 1:
            raise ValueError(f"--workers and --partitions must be >= 1; got {self.workers}, {self.partitions}")
        if not self.json_keys:
            raise ValueError("--json-keys needs at least one key")


@dataclass
class PreprocessSummary:
    output_prefixes: Dict[str, List[str]]  # json key -> the dataset prefixes written (one, or the kept partials)
    documents: Dict[str, int]
    tokens: Dict[str, int]
    input_bytes: int
    lines: int
    seconds: float
    bad: BadInputLog
    input_paths: List[str]
    resumed_partitions: int = 0
    data_path_files: Dict[str, str] = field(default_factory=dict)  # json key -> its --data-path blend file

    def report_lines(self) -> List[str]:
        secs = max(self.seconds, 1e-9)
        docs, toks = sum(self.documents.values()), sum(self.tokens.values())
        lines = [
            f"done: {self.lines:,} lines, {docs:,} documents, {toks:,} tokens from "
            f"{self.input_bytes / 1e6:,.1f} MB in {self.seconds:.1f} s "
            f"({docs / secs:,.0f} docs/s, {toks / secs:,.0f} tokens/s, {self.input_bytes / 1e6 / secs:,.2f} MB/s)",
        ]
        for key, prefixes in self.output_prefixes.items():
            if len(prefixes) == 1:
                where = f"{prefixes[0]}.bin/.idx"
            else:
                where = f"{len(prefixes)} datasets" + (f" {prefixes[0]}.bin/.idx ..." if prefixes else "")
            if key in self.data_path_files:
                where += f" (--data-path $(cat {self.data_path_files[key]}))"
            lines.append(f"  {key}: {self.documents[key]:,} documents, {self.tokens[key]:,} tokens -> {where}")
        if self.bad.counts:
            lines.append(f"bad input: {self.bad.num_bad:,} skipped")
            lines.extend(self.bad.format(self.input_paths))
        return lines


def dataset_prefix(output_prefix: str, json_key: str) -> str:
    """Megatron-LM's naming: one dataset per JSON key, at document level."""
    return f"{output_prefix}_{json_key}_document"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _split_files(paths: List[str], parts: int) -> List[List[str]]:
    """Contiguous groups of files with about equal total size (never more groups than files)."""
    parts = max(1, min(parts, len(paths)))
    sizes = [max(os.path.getsize(p), 1) for p in paths]
    total, done = sum(sizes), 0
    groups: List[List[str]] = [[]]
    for i, (path, size) in enumerate(zip(paths, sizes)):
        groups_to_open = parts - len(groups)
        if groups[-1] and (done >= total * len(groups) / parts or len(paths) - i <= groups_to_open):
            groups.append([])
        groups[-1].append(path)
        done += size
    return groups


class _Tokenizers:
    """Where batches are tokenized: in this process (one worker), or in a pool of spawned worker processes
    shared by all partitions. ``ordered(batches)`` yields results in input order with at most a few batches per
    worker in flight (bounded memory)."""

    def __init__(self, workers: int, init_args: tuple) -> None:
        self.workers = workers
        self.pool = None
        if workers == 1:
            init_worker(*init_args)
        else:
            # spawn: workers do not inherit the parent's torch/OpenMP state, and start the same everywhere.
            # ProcessPoolExecutor (not multiprocessing.Pool): a worker that dies raises BrokenProcessPool here
            # instead of leaving the run waiting forever.
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=init_worker, initargs=init_args + (True,))

    def ordered(self, batches: Iterator) -> Iterator[BatchResult]:
        if self.pool is None:
            for batch in batches:
                yield worker_tokenize(batch)
            return
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append(self.pool.submit(worker_tokenize, batch))
                if len(pending) >= 3 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class _Progress:
    def __init__(self, interval: int, log: Callable[[str], None]) -> None:
        self.interval, self.log = interval, log
        self.start = time.perf_counter()
        self.docs = self.tokens = self.bytes = self.skipped = 0
        self.next_report = interval

    def update(self, docs: int, tokens: int, num_bytes: int, skipped: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += num_bytes
        self.skipped += skipped
        if self.interval > 0 and self.docs >= self.next_report:
            self.next_report = (self.docs // self.interval + 1) * self.interval
            secs = max(time.perf_counter() - self.start, 1e-9)
            self.log(
                f"processed {self.docs:,} documents | {self.docs / secs:,.0f} docs/s | "
                f"{self.tokens / secs:,.0f} tokens/s | {self.bytes / 1e6 / secs:,.2f} MB/s | "
                f"skipped {self.skipped:,}"
            )


def _file_fingerprint(paths: Sequence[str]) -> list:
    return [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


def _tokenizer_fingerprint(spec: TokenizerSpec) -> list:
    """Size and mtime of every file the tokenizer reads (a directory: of its files): a tokenizer changed in place
    keeps its paths, and partials made with the old one must not be reused."""
    files = []
    for path in (spec.tokenizer_model, spec.vocab_file, spec.merge_file):
        if not path or not os.path.exists(path):
            continue
        if os.path.isdir(path):
            files.extend(sorted(e.path for e in os.scandir(path) if e.is_file()))
        else:
            files.append(path)
    return _file_fingerprint([os.path.abspath(f) for f in files])


class _Writers:
    """One atomic dataset writer per JSON key; ``commit`` publishes them all, ``discard`` removes them."""

    def __init__(self, prefixes: Dict[str, str], dtype) -> None:
        self.prefixes = prefixes
        self.writers = {}
        try:
            for key, prefix in prefixes.items():
                self.writers[key] = AtomicDatasetWriter(prefix, dtype)
        except BaseException:
            self.discard()
            raise
        self.documents = {k: 0 for k in prefixes}
        self.tokens = {k: 0 for k in prefixes}

    def add(self, key: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append a batch of single-sequence documents: exactly what ``add_document(doc, [len(doc)])`` per
        document does to the builder (tested byte for byte), in one write instead of one call per document, which
        would make the main process the bottleneck at a few dozen workers."""
        builder = self.writers[key].builder
        builder.data_file.write(np.ascontiguousarray(tokens, dtype=builder.dtype).tobytes())
        builder.sequence_lengths.extend(lengths.tolist())
        count = len(builder.sequence_lengths)
        builder.document_indices.extend(range(count - lengths.size + 1, count + 1))
        self.documents[key] += int(lengths.size)
        self.tokens[key] += int(tokens.size)

    def commit(self) -> None:
        for writer in self.writers.values():
            writer.commit()

    def discard(self) -> None:
        for writer in self.writers.values():
            writer.discard()


def _stderr(msg: str) -> None:
    print(f"[preprocess_data] {msg}", file=sys.stderr, flush=True)


def preprocess(options: PreprocessOptions, log: Callable[[str], None] = _stderr) -> PreprocessSummary:
    """Run the whole conversion; returns the counts. Raises InputError under --on-error fail."""
    from megatron.core.datasets.indexed_dataset import DType

    start = time.perf_counter()
    paths = expand_inputs(options.inputs)
    tokenizer = options.tokenizer.build()
    vocab_size = tokenizer.vocab_size
    if options.append_eod:
        _ = tokenizer.eod  # fail now, not in a worker, if the tokenizer has no EOD
    dtype = DType.optimal_dtype(vocab_size)
    finals = {k: dataset_prefix(options.output_prefix, k) for k in options.json_keys}
    out_dir = os.path.dirname(os.path.abspath(options.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    log(f"{len(paths)} input file(s), tokenizer {options.tokenizer.tokenizer_type} (vocab {vocab_size:,}, "
        f"{np.dtype(dtype).name} tokens), {options.workers} worker(s)")

    groups = _split_files(paths, options.partitions)
    init_args = (options.tokenizer, options.json_keys, options.append_eod, options.error_samples, np.dtype(dtype))
    progress = _Progress(options.log_interval, log)
    bad = BadInputLog(max_samples=options.error_samples)
    documents = {k: 0 for k in finals}
    tokens = {k: 0 for k in finals}
    totals = {"bytes": 0, "lines": 0}
    resumed = 0
    settings = {
        "json_keys": options.json_keys, "tokenizer": asdict(options.tokenizer),
        "tokenizer_files": _tokenizer_fingerprint(options.tokenizer), "append_eod": options.append_eod,
        "max_line_bytes": options.max_line_bytes, "dtype": np.dtype(dtype).name,
    }

    part_prefixes: List[Dict[str, str]] = []
    part_tokens: List[Dict[str, int]] = []
    tokenizers: Optional[_Tokenizers] = None  # started at the first partition that is not reused
    try:
        for g, group in enumerate(groups):
            if len(groups) == 1:
                prefixes = finals
            else:
                prefixes = {k: f"{p}.part{g + 1:04d}of{len(groups):04d}" for k, p in finals.items()}
            part_prefixes.append(prefixes)
            stamp_path = next(iter(prefixes.values())) + ".stamp.json"
            stamp = {"files": _file_fingerprint(group), **settings}
            if len(groups) > 1 and _stamp_matches(stamp_path, stamp, prefixes):
                with open(stamp_path) as f:
                    done = json.load(f)
                for k in finals:
                    documents[k] += done["documents"][k]
                    tokens[k] += done["tokens"][k]
                totals["bytes"] += done["bytes"]
                totals["lines"] += done["lines"]
                bad.merge(BadInputLog.from_json(done["bad"], paths, options.error_samples))
                part_tokens.append(done["tokens"])
                resumed += 1
                log(f"partition {g + 1}/{len(groups)}: reusing finished output ({len(group)} file(s))")
                continue

            if tokenizers is None:
                tokenizers = _Tokenizers(options.workers, init_args)
            writers = _Writers(prefixes, dtype)
            part_bad = BadInputLog(max_samples=options.error_samples)
            part_bytes = part_lines = 0
            try:
                batches = read_line_batches(group, max_line_bytes=options.max_line_bytes,
                                            batch_bytes=options.batch_bytes,
                                            file_index_offset=paths.index(group[0]))
                for result in tokenizers.ordered(batches):
                    if options.on_error == "fail" and result.bad.num_bad:
                        kind, f, ln, detail = result.bad.first_error()
                        raise InputError(
                            f"{paths[f]}:{ln}: {kind}: {detail}\n(--on-error fail stops at the first bad "
                            f"document; --on-error skip counts, reports and leaves out bad documents)"
                        )
                    for key, out in result.outputs.items():
                        writers.add(key, out.tokens, out.lengths)
                    part_bad.merge(result.bad)
                    part_bytes += result.num_bytes
                    part_lines += result.num_lines
                    progress.update(sum(o.lengths.size for o in result.outputs.values()),
                                    sum(o.tokens.size for o in result.outputs.values()),
                                    result.num_bytes, result.bad.num_bad)
                total_docs = sum(documents.values()) + sum(writers.documents.values())
                if g == len(groups) - 1 and total_docs == 0:
                    raise InputError(
                        "no valid document in the input: check --json-keys and the input format\n"
                        + "\n".join(part_bad.format(paths))
                    )
                writers.commit()
            except BaseException:
                writers.discard()
                raise
            for k in finals:
                documents[k] += writers.documents[k]
                tokens[k] += writers.tokens[k]
            totals["bytes"] += part_bytes
            totals["lines"] += part_lines
            bad.merge(part_bad)
            part_tokens.append(dict(writers.tokens))
            if len(groups) > 1:
                done = {**stamp, "documents": writers.documents, "tokens": writers.tokens, "bytes": part_bytes,
                        "lines": part_lines, "bad": part_bad.to_json(paths)}
                _write_json_atomic(stamp_path, done)
                log(f"partition {g + 1}/{len(groups)} finished")
    finally:
        if tokenizers is not None:
            tokenizers.close()

    written = {k: [final] for k, final in finals.items()}
    data_path_files: Dict[str, str] = {}
    if options.keep_partitions:
        # Weighted by tokens, so a blend of the partials samples like the merged dataset would. A partial without
        # a document of the key has no dataset to name (megatron-core refuses empty ones in a blend).
        for key, final in finals.items():
            kept = [(t[key], p[key]) for t, p in zip(part_tokens, part_prefixes) if t[key]]
            written[key] = [p for _, p in kept]
            data_path_files[key] = final + ".data_path.txt"
            with open(data_path_files[key], "w") as f:
                f.write(" ".join(f"{t} {p}" for t, p in kept) + "\n")
            log(f"{key}: kept {len(kept)} dataset(s); pass --data-path $(cat {data_path_files[key]})")
    elif len(groups) > 1:
        if sum(documents.values()) == 0:
            raise InputError("no valid document in the input: check --json-keys and the input format")
        for key, final in finals.items():
            with AtomicDatasetWriter(final, dtype) as writer:
                for prefixes in part_prefixes:
                    writer.builder.add_index(prefixes[key])
        for prefixes in part_prefixes:
            for p in prefixes.values():
                for suffix in (".bin", ".idx"):
                    _remove(p + suffix)
            _remove(next(iter(prefixes.values())) + ".stamp.json")

    summary = PreprocessSummary(
        output_prefixes=written, documents=documents, tokens=tokens, input_bytes=totals["bytes"],
        lines=totals["lines"], seconds=time.perf_counter() - start, bad=bad, input_paths=paths,
        resumed_partitions=resumed, data_path_files=data_path_files,
    )
    _write_json_atomic(options.output_prefix + REPORT_SUFFIX, {
        "inputs": paths, "outputs": written, "data_path_files": data_path_files, "documents": documents,
        "tokens": tokens, "input_bytes": totals["bytes"], "lines": totals["lines"], "seconds": summary.seconds,
        "bad_input": bad.to_json(paths), "settings": settings,
    })
    for line in summary.report_lines():
        log(line)
    return summary


def _stamp_matches(stamp_path: str, stamp: dict, prefixes: Dict[str, str]) -> bool:
    if not os.path.isfile(stamp_path):
        return False
    if not all(os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx") for p in prefixes.values()):
        return False
    try:
        with open(stamp_path) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return False
    return all(done.get(k) == v for k, v in json.loads(json.dumps(stamp)).items())


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
