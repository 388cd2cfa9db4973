"""Reading JSONL inputs and turning lines into token arrays, with every kind of bad input counted, not fatal.

This is the worker side of preprocessing: it imports no torch, so that worker processes start fast.
A *batch* is a run of consecutive lines of one input file; ``tokenize_batch`` maps it to one ``KeyOutput`` per
JSON key (all documents' tokens concatenated, plus their lengths) and a ``BadInputLog``. The output of a batch
depends on its lines only, which is what makes the output identical for any number of workers.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

# Bad-input categories, in report order, with the meaning printed in the report.
BAD_INPUT_KINDS = {
    "unreadable_input": "file could not be read on (corrupt/truncated compressed data, I/O error); rest skipped",
    "line_too_long": "line longer than --max-line-bytes (skipped unread)",
    "invalid_utf8": "line is not valid UTF-8",
    "malformed_json": "line is not valid JSON",
    "not_an_object": "JSON value is not an object",
    "missing_key": "object lacks a --json-keys key",
    "non_string_value": "value under the key is not a string",
    "invalid_unicode": "string holds lone surrogate escapes (not encodable as UTF-8)",
    "empty_document": "string is empty or whitespace only",
    "no_tokens": "tokenizer produced no tokens",
    "tokenizer_error": "tokenizer raised an error",
}
# Not an error, but counted: blank lines between JSONL records.
BLANK_LINE = "blank_line"

COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")


class InputError(ValueError):
    """Bad input met under ``--on-error fail``, or an input that cannot be opened."""


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Expand files, directories (their files, sorted) and glob patterns, keeping the given order, once each."""
    paths: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(p for p in glob.glob(os.path.join(pattern, "*")) if os.path.isfile(p))
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        else:
            found = [pattern] if os.path.isfile(pattern) else []
        if not found:
            raise InputError(f"--input {pattern!r} matches no file")
        paths.extend(found)
    unique = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    return unique


def open_input(path: str) -> io.BufferedIOBase:
    """Open a (possibly compressed) input file for binary reading."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError as err:
            raise InputError(f"{path}: reading .zst needs the `zstandard` package: pip install zstandard") from err
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


@dataclass
class LineBatch:
    """Consecutive whole lines of one file, as one bytes block (cheap to send to a worker process).

    ``long_line`` marks instead a single line longer than the read buffer allows, which was dropped unread;
    ``read_error`` marks the point where the file could not be read on.
    """

    file_index: int
    first_line: int  # 1-based number of the block's first line in its file
    data: bytes
    num_lines: int
    max_line_bytes: int
    long_line: bool = False
    read_error: Optional[str] = None  # the file could not be read on from this line

    @property
    def num_bytes(self) -> int:
        return len(self.data)

    def lines(self) -> List[bytes]:
        lines = self.data.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()  # the block ends with a newline
        return lines


def read_line_batches(
    paths: Sequence[str], *, max_line_bytes: int, batch_bytes: int = 1 << 20, file_index_offset: int = 0,
) -> Iterator[LineBatch]:
    """Yield each file as blocks of about ``batch_bytes`` of whole lines. The reading process only finds newlines
    and counts them; a line that grows past ``max_line_bytes`` without a newline is read on and dropped in pieces
    (never held whole), and reported as one ``long_line`` batch. A file that fails part-way (truncated or corrupt
    compressed data, an I/O error) keeps the whole lines read before the failure and is reported by a
    ``read_error`` batch; reading goes on with the next file."""
    for index, path in enumerate(paths):
        reader = _BlockReader(file_offset=file_index_offset + index, max_line_bytes=max_line_bytes,
                              batch_bytes=batch_bytes)
        try:
            with open_input(path) as stream:
                yield from reader.blocks(stream)
        except InputError:
            raise  # a configuration problem (a missing decompressor), not bad data
        except Exception as err:  # noqa: BLE001 - any failure to read on is reported as bad input
            yield from reader.flush_whole_lines()
            yield LineBatch(reader.file_index, reader.line, b"", 0, max_line_bytes,
                            read_error=f"{type(err).__name__}: {_short(str(err))}; rest of the file skipped")


class _BlockReader:
    def __init__(self, file_offset: int, max_line_bytes: int, batch_bytes: int) -> None:
        self.file_index, self.max_line_bytes, self.batch_bytes = file_offset, max_line_bytes, batch_bytes
        self.pending, self.line = bytearray(), 1

    def _emit(self, upto: int) -> LineBatch:
        block = bytes(self.pending[:upto])
        del self.pending[:upto]
        count = block.count(b"\n") + (not block.endswith(b"\n"))
        batch = LineBatch(self.file_index, self.line, block, count, self.max_line_bytes)
        self.line += count
        return batch

    def flush_whole_lines(self) -> Iterator[LineBatch]:
        cut = self.pending.rfind(b"\n")
        if cut >= 0:
            yield self._emit(cut + 1)
        self.pending = bytearray()  # a partial line cut off by the failure is dropped

    def blocks(self, stream) -> Iterator[LineBatch]:
        # read1, not read: read() of a compressed stream gathers several decompression steps and, when a later one
        # fails (a truncated file), raises and drops all it had decoded; read1() returns each step's output.
        while True:
            chunk = stream.read1(self.batch_bytes)
            if not chunk:
                if self.pending:
                    yield self._emit(len(self.pending))
                return
            self.pending += chunk
            cut = self.pending.rfind(b"\n")
            if cut < 0:
                if len(self.pending) > self.max_line_bytes:  # one over-long line: skip to its end
                    while chunk:
                        chunk = stream.read1(self.batch_bytes)
                        newline = chunk.find(b"\n")
                        if newline >= 0:
                            break
                    yield LineBatch(self.file_index, self.line, b"", 1, self.max_line_bytes, long_line=True)
                    self.line += 1
                    self.pending = bytearray(chunk[newline + 1:] if chunk else b"")
                continue
            if len(self.pending) >= self.batch_bytes:
                yield self._emit(cut + 1)


@dataclass
class BadInputLog:
    """Counts of bad input per kind and a few (file index, line, detail) samples per kind."""

    counts: Dict[str, int] = field(default_factory=dict)
    samples: Dict[str, List[Tuple[int, int, str]]] = field(default_factory=dict)
    max_samples: int = 5
    # The earliest bad record (file index, line, kind, detail), kept even with max_samples 0: --on-error fail names it.
    first: Optional[Tuple[int, int, str, str]] = None

    def add(self, kind: str, file_index: int, line: int, detail: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        kept = self.samples.setdefault(kind, [])
        if len(kept) < self.max_samples:
            kept.append((file_index, line, detail))
        if kind != BLANK_LINE:
            self._note_first((file_index, line, kind, detail))

    def _note_first(self, error: Optional[Tuple[int, int, str, str]]) -> None:
        if error is not None and (self.first is None or error[:2] < self.first[:2]):
            self.first = error

    def merge(self, other: "BadInputLog") -> None:
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
        for kind, items in other.samples.items():
            kept = self.samples.setdefault(kind, [])
            kept.extend(items[: max(0, self.max_samples - len(kept))])
        self._note_first(other.first)

    @property
    def num_bad(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind != BLANK_LINE)

    def first_error(self) -> Optional[Tuple[str, int, int, str]]:
        """The earliest bad record (by file, then line) as (kind, file index, line, detail); None if none."""
        if self.first is None:
            return None
        f, ln, kind, d = self.first
        return kind, f, ln, d

    def to_json(self, paths: Sequence[str]) -> dict:
        return {
            "counts": dict(self.counts),
            "samples": {kind: [[paths[f], ln, d] for f, ln, d in items] for kind, items in self.samples.items()},
        }

    @classmethod
    def from_json(cls, data: dict, paths: Sequence[str], max_samples: int) -> "BadInputLog":
        index = {p: i for i, p in enumerate(paths)}
        log = cls(counts=dict(data["counts"]), max_samples=max_samples)
        for kind, items in data["samples"].items():
            log.samples[kind] = [(index[p], ln, d) for p, ln, d in items]
        return log

    def format(self, paths: Sequence[str]) -> List[str]:
        """Human-readable report lines: one per kind with its count and file:line samples."""
        out = []
        for kind in list(BAD_INPUT_KINDS) + [BLANK_LINE]:
            n = self.counts.get(kind, 0)
            if not n:
                continue
            meaning = BAD_INPUT_KINDS.get(kind, "blank line (ignored)")
            out.append(f"  {kind}: {n:,}  ({meaning})")
            if kind != BLANK_LINE:
                out.extend(f"      {paths[f]}:{ln}: {d}" for f, ln, d in self.samples.get(kind, []))
        return out


@dataclass
class KeyOutput:
    """The documents of one JSON key in a batch: tokens concatenated, and each document's length."""

    tokens: np.ndarray  # [sum(lengths)], in the output dtype
    lengths: np.ndarray  # [num_documents] int64


@dataclass
class BatchResult:
    outputs: Dict[str, KeyOutput]
    bad: BadInputLog
    num_bytes: int
    num_lines: int


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _concatenate(docs: List, eod: Optional[int]) -> np.ndarray:
    """One int64 array of all documents' ids, each followed by ``eod`` unless it is None."""
    if docs and isinstance(docs[0], np.ndarray):
        parts = []
        tail = np.array([eod], dtype=np.int64) if eod is not None else None
        for d in docs:
            parts.append(d)
            if tail is not None:
                parts.append(tail)
        return np.concatenate(parts).astype(np.int64, copy=False)
    flat: List[int] = []
    for d in docs:
        flat.extend(d)
        if eod is not None:
            flat.append(eod)
    return np.array(flat, dtype=np.int64)


def _value_problem(record: dict, key: str) -> Optional[Tuple[str, str]]:
    """(kind, detail) when ``record[key]`` is not a usable document, else None."""
    if key not in record:
        return "missing_key", f"no {key!r} (keys: {_short(', '.join(map(str, record)))})"
    value = record[key]
    if not isinstance(value, str):
        return "non_string_value", f"{key!r} is {type(value).__name__}"
    if not value.strip():
        return "empty_document", f"{key!r} is {value!r}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return "invalid_unicode", f"{key!r} char {err.start}: {err.reason}"
    return None


def _tokenize_documents(tokenizer, texts: List[str], key: str) -> Tuple[List, Dict[int, Tuple[str, str]]]:
    """Token ids per text (None where it failed) and, by text index, the (kind, detail) of each failure."""
    failures: Dict[int, Tuple[str, str]] = {}
    try:
        token_lists = list(tokenizer.tokenize_batch(texts))
    except Exception:  # find the documents at fault one by one
        token_lists = []
        for i, text in enumerate(texts):
            try:
                token_lists.append(tokenizer.tokenize(text))
            except Exception as err:  # noqa: BLE001 - any tokenizer failure is bad input, logged
                failures[i] = ("tokenizer_error", f"{type(err).__name__}: {_short(str(err))}")
                token_lists.append(None)
    for i, ids in enumerate(token_lists):
        if ids is not None and len(ids) == 0:
            failures[i] = ("no_tokens", f"{key!r} tokenized to nothing")
            token_lists[i] = None
    return token_lists, failures


def tokenize_batch(batch: LineBatch, tokenizer, json_keys: Sequence[str], append_eod: bool,
                   max_samples: int = 5, out_dtype=np.int64) -> BatchResult:
    """Validate and tokenize every line of the batch; bad documents are logged and left out."""
    bad = BadInputLog(max_samples=max_samples)
    # One record gives one document per key; a record bad under any key is left out under all of them (and counted
    # once), so that document i of every key's dataset comes from the same record.
    texts: Dict[str, List[str]] = {k: [] for k in json_keys}
    where: List[int] = []
    f = batch.file_index
    if batch.long_line:
        bad.add("line_too_long", f, batch.first_line, f"longer than {batch.max_line_bytes:,} bytes; skipped unread")
    if batch.read_error:
        bad.add("unreadable_input", f, batch.first_line, batch.read_error)
    for offset, raw in enumerate(batch.lines()):
        ln = batch.first_line + offset
        if len(raw) > batch.max_line_bytes:
            bad.add("line_too_long", f, ln, f"{len(raw):,} bytes > {batch.max_line_bytes:,}; skipped")
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.add("invalid_utf8", f, ln, f"byte {err.start}: {err.reason}")
            continue
        if not line.strip():
            bad.add(BLANK_LINE, f, ln, "blank line")
            continue
        if ln == 1 and line.startswith("\ufeff"):  # a UTF-8 byte-order mark opening the file
            line = line[1:]
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
            bad.add("malformed_json", f, ln, _short(str(err)) or type(err).__name__)
            continue
        if not isinstance(record, dict):
            bad.add("not_an_object", f, ln, f"got {type(record).__name__}")
            continue
        problem = next(filter(None, (_value_problem(record, key) for key in json_keys)), None)
        if problem is not None:
            bad.add(problem[0], f, ln, problem[1])
            continue
        for key in json_keys:
            texts[key].append(record[key])
        where.append(ln)

    token_lists, failed = {}, {}
    for key in json_keys:
        token_lists[key], failures = _tokenize_documents(tokenizer, texts[key], key)
        for i, (kind, detail) in failures.items():
            failed.setdefault(i, (kind, detail))  # the record's first failing key
    for i, (kind, detail) in sorted(failed.items()):
        bad.add(kind, f, where[i], detail)
    good = [i not in failed for i in range(len(where))]
    outputs: Dict[str, KeyOutput] = {}
    for key in json_keys:
        kept = [ids for ids, ok in zip(token_lists[key], good) if ok]
        lengths = [len(ids) + int(append_eod) for ids in kept]
        tokens = _concatenate(kept, tokenizer.eod if append_eod else None)
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= tokenizer.vocab_size):
            raise ValueError(f"token id {int(tokens.max())} outside the tokenizer's vocabulary of "
                             f"{tokenizer.vocab_size}: the tokenizer files disagree with each other")
        outputs[key] = KeyOutput(tokens=tokens.astype(out_dtype, copy=False),
                                 lengths=np.asarray(lengths, dtype=np.int64))
    return BatchResult(outputs=outputs, bad=bad, num_bytes=batch.num_bytes, num_lines=batch.num_lines)


# Worker-process state (set once per process by init_worker).
_WORKER: dict = {}


def init_worker(tokenizer_spec, json_keys: Sequence[str], append_eod: bool, max_samples: int,
                out_dtype=np.int64, in_subprocess: bool = False) -> None:
    if in_subprocess:  # one core per worker: keep Hugging Face tokenizers from starting a thread pool each
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(tokenizer=tokenizer_spec.build(), json_keys=list(json_keys), append_eod=append_eod,
                   max_samples=max_samples, out_dtype=out_dtype)


def worker_tokenize(batch: LineBatch) -> BatchResult:
    return tokenize_batch(batch, _WORKER["tokenizer"], _WORKER["json_keys"], _WORKER["append_eod"],
                          _WORKER["max_samples"], _WORKER["out_dtype"])
