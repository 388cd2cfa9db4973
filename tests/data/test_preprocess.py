"""tools/preprocess_data.py: round trip, determinism across workers/partitions, bad input, interruption."""

import gzip
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from megatron_ext.data import preprocess as preprocess_module
from megatron_ext.data.corpus import CORPUS_FILE, TOKENIZER_MODEL
from megatron_ext.data.documents import InputError
from megatron_ext.data.preprocess import PreprocessOptions, dataset_prefix, preprocess
from megatron_ext.data.tokenizers import TokenizerSpec

SP = TokenizerSpec("SentencePieceTokenizer", tokenizer_model=TOKENIZER_MODEL)
BYTES = TokenizerSpec("ByteLevelTokenizer")


def corpus_texts(n=None):
    with open(CORPUS_FILE) as f:
        return [json.loads(line)["text"] for line in f][:n]


def read_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return ds, [np.asarray(ds[i]).tolist() for i in range(len(ds))]


def run(tmp_path, inputs, spec=BYTES, name="out", **kw):
    kw.setdefault("log_interval", 0)
    options = PreprocessOptions(inputs=[str(p) for p in inputs], output_prefix=str(tmp_path / name),
                                tokenizer=spec, **kw)
    return preprocess(options, log=lambda msg: None)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.mark.parametrize("spec", [SP, BYTES], ids=["sentencepiece", "bytelevel"])
@pytest.mark.parametrize("append_eod", [True, False])
def test_round_trip_equals_tokenizer_output(tmp_path, spec, append_eod):
    texts = corpus_texts(60)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "n": i} for i, t in enumerate(texts)])
    summary = run(tmp_path, [path], spec=spec, append_eod=append_eod)
    tok = spec.build()
    ds, docs = read_dataset(dataset_prefix(str(tmp_path / "out"), "text"))
    expected = [tok.tokenize(t) + ([tok.eod] if append_eod else []) for t in texts]
    assert docs == expected
    assert ds.index.dtype == np.uint16  # smallest megatron dtype for a vocabulary < 65500
    assert list(ds.document_indices) == list(range(len(texts) + 1))
    assert summary.documents["text"] == len(texts) and summary.tokens["text"] == sum(map(len, expected))


def test_hugging_face_tokenizer_round_trip_with_workers(tmp_path, hf_tokenizer_json):
    spec = TokenizerSpec("HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_json)
    texts = corpus_texts(40)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    run(tmp_path, [path], spec=spec, append_eod=True, workers=2, batch_bytes=4096)
    tok = spec.build()
    assert read_dataset(dataset_prefix(str(tmp_path / "out"), "text"))[1] == [tok.tokenize(t) + [tok.eod]
                                                                               for t in texts]


def test_several_json_keys_get_their_own_datasets(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)])
    run(tmp_path, [path], json_keys=["q", "a"], append_eod=True)
    for key in ("q", "a"):
        _, docs = read_dataset(dataset_prefix(str(tmp_path / "out"), key))
        word = "question" if key == "q" else "answer"
        assert docs == [list(f"{word} {i}".encode()) + [256] for i in range(5)]


def test_a_record_bad_under_one_key_is_left_out_of_every_key_and_counted_once(tmp_path):
    records = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(8)]
    del records[1]["a"]  # missing_key under a
    records[3]["q"] = 7  # non_string_value under q
    records[5]["a"] = "   "  # empty_document under a
    path = write_jsonl(tmp_path / "in.jsonl", records)
    summary = run(tmp_path, [path], json_keys=["q", "a"], append_eod=True)
    assert summary.bad.counts == {"missing_key": 1, "non_string_value": 1, "empty_document": 1}
    assert [(kind, ln) for kind, items in summary.bad.samples.items() for _, ln, _ in items] == [
        ("missing_key", 2), ("non_string_value", 4), ("empty_document", 6)]
    good = [0, 2, 4, 6, 7]
    for key, word in (("q", "question"), ("a", "answer")):
        _, docs = read_dataset(dataset_prefix(str(tmp_path / "out"), key))
        assert docs == [list(f"{word} {i}".encode()) + [256] for i in good]  # document i: the same record


def test_a_tokenizer_failure_under_one_key_drops_the_record_under_every_key():
    from megatron_ext.data.documents import LineBatch, tokenize_batch
    from megatron_ext.data.tokenizers import ByteLevelTokenizer

    class FailsOnBoom(ByteLevelTokenizer):
        def tokenize(self, text):
            if "boom" in text:
                raise RuntimeError("cannot encode boom")
            return super().tokenize(text)

        def tokenize_batch(self, texts):
            return [self.tokenize(t) for t in texts]

    lines = [json.dumps({"q": f"q{i}", "a": "boom" if i == 1 else f"a{i}"}).encode() for i in range(3)]
    batch = LineBatch(0, 1, b"\n".join(lines) + b"\n", 3, 1 << 20)
    result = tokenize_batch(batch, FailsOnBoom(), ["q", "a"], append_eod=False)
    assert result.bad.counts == {"tokenizer_error": 1} and result.bad.samples["tokenizer_error"][0][1] == 2
    for key in ("q", "a"):
        assert result.outputs[key].lengths.tolist() == [2, 2]
        assert bytes(result.outputs[key].tokens.astype(np.uint8)) == f"{key}0{key}2".encode()


def test_workers_and_partitions_give_byte_identical_files(tmp_path):
    texts = corpus_texts(240)
    files = [write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:100]]),
             tmp_path / "b.jsonl.gz", write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts[140:]])]
    with gzip.open(files[1], "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[100:140])
    common = dict(spec=SP, append_eod=True, batch_bytes=4096)  # many small batches: ordering is exercised
    run(tmp_path, files, name="w1", workers=1, **common)
    run(tmp_path, files, name="w2", workers=2, **common)
    run(tmp_path, [tmp_path / "*.jsonl*"], name="p3", workers=2, partitions=3, **common)  # a glob, 3 partials
    outputs = {}
    for name in ("w1", "w2", "p3"):
        prefix = dataset_prefix(str(tmp_path / name), "text")
        outputs[name] = [open(prefix + s, "rb").read() for s in (".bin", ".idx")]
    assert outputs["w1"] == outputs["w2"] == outputs["p3"]
    _, docs = read_dataset(dataset_prefix(str(tmp_path / "w1"), "text"))
    assert len(docs) == 240 and docs[100] == SP.build().tokenize(texts[100]) + [2]  # the .gz file, in order
    leftovers = [p for p in os.listdir(tmp_path) if "part" in p or p.endswith(".tmp")]
    assert leftovers == []


BAD_LINES = [
    (b'{"text": "good one"}', None),
    (b'{"text": "unterminated', "malformed_json"),
    (b'{"title": "no text key"}', "missing_key"),
    (b'{"text": 42}', "non_string_value"),
    (b'{"text": null}', "non_string_value"),
    (b'{"text": ["a", "list"]}', "non_string_value"),
    (b'{"text": "bad \xff\xfe bytes"}', "invalid_utf8"),
    (b'{"text": ""}', "empty_document"),
    (b'{"text": "  \\n\\t "}', "empty_document"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_unicode"),
    (b'["not", "an", "object"]', "not_an_object"),
    (b'{"text": "' + b"x" * 400_000 + b'"}', "line_too_long"),
    (b"", "blank_line"),
    (b"[" * 100000 + b"]" * 100000, "malformed_json"),  # nesting deeper than the JSON parser's recursion
    (b'{"text": "good two \\u00e9"}', None),
    (b'{"text": "good three', None),  # last line without newline is still read ... and is malformed
]


@pytest.mark.parametrize("batch_bytes", [4096, 1 << 20], ids=["long-line-dropped-unread", "long-line-in-block"])
def test_every_bad_input_is_counted_reported_and_skipped(tmp_path, batch_bytes):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\xef\xbb\xbf"  # a byte-order mark before the first record is not an error
                     + b"\n".join(line for line, _ in BAD_LINES[:-1]) + b"\n" + b'{"text": "good three"}')
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": f"fine {i}"} for i in range(3)])
    summary = run(tmp_path, [good, path], append_eod=True, max_line_bytes=300_000, batch_bytes=batch_bytes)
    expected_counts = {}
    for _, kind in BAD_LINES[:-1]:
        if kind:
            expected_counts[kind] = expected_counts.get(kind, 0) + 1
    assert summary.bad.counts == expected_counts
    # samples name file:line (line numbers are 1-based)
    report = json.load(open(str(tmp_path / "out") + preprocess_module.REPORT_SUFFIX))
    for lineno, (_, kind) in enumerate(BAD_LINES[:-1], start=1):
        if kind and kind != "blank_line":
            assert any(s[0] == str(path) and s[1] == lineno for s in report["bad_input"]["samples"][kind]), kind
    # every good document is intact, in order
    _, docs = read_dataset(dataset_prefix(str(tmp_path / "out"), "text"))
    texts = [f"fine {i}" for i in range(3)] + ["good one", "good two \u00e9", "good three"]
    assert docs == [list(t.encode()) + [256] for t in texts]
    lines = summary.report_lines()
    assert any(f"{path}:2:" in line for line in lines)


def test_on_error_fail_stops_at_first_bad_document_and_leaves_no_idx(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": f"fine {i}"} for i in range(50)])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": 7}\n{"text": broken\n')
    with pytest.raises(InputError, match=rf"{bad}:2: non_string_value"):
        run(tmp_path, [good, bad], on_error="fail")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl"]


def test_on_error_fail_names_the_first_bad_document_even_with_no_error_samples(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "fine"}\n{"txt": "x"}\n{"text": 7}\n')
    with pytest.raises(InputError, match=rf"{path}:3: missing_key"):
        run(tmp_path, [path], on_error="fail", error_samples=0)


def test_interrupted_run_leaves_no_complete_looking_idx_and_resumes_partitions(tmp_path, monkeypatch):
    texts = corpus_texts(90)
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [{"text": t} for t in texts[i * 30:(i + 1) * 30]])
             for i in range(3)]
    reference = run(tmp_path, files, name="ref", batch_bytes=2048)
    real_add, calls = preprocess_module._Writers.add, []

    def add_then_interrupt(self, key, tokens, lengths):
        if "part0003of0003" in self.prefixes[key]:
            calls.append(1)
            if len(calls) == 3:  # in the middle of the last partition
                raise KeyboardInterrupt
        return real_add(self, key, tokens, lengths)

    monkeypatch.setattr(preprocess_module._Writers, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, files, name="out", partitions=3, batch_bytes=2048)
    final = dataset_prefix(str(tmp_path / "out"), "text")
    assert not os.path.exists(final + ".idx") and not os.path.exists(final + ".bin")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    finished = [p for p in os.listdir(tmp_path) if p.endswith(".stamp.json")]
    assert len(finished) == 2  # finished partitions are kept for the rerun

    monkeypatch.setattr(preprocess_module._Writers, "add", real_add)
    summary = run(tmp_path, files, name="out", partitions=3, batch_bytes=2048)
    assert summary.resumed_partitions == len(finished)
    ref = dataset_prefix(str(tmp_path / "ref"), "text")
    for suffix in (".bin", ".idx"):
        assert open(final + suffix, "rb").read() == open(ref + suffix, "rb").read()
    assert summary.documents == reference.documents


def test_compressed_and_missing_inputs(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        run(tmp_path, [tmp_path / "nothing-*.jsonl"])
    zst = tmp_path / "in.jsonl.zst"
    if importlib.util.find_spec("zstandard") is None:
        zst.write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(InputError, match="pip install zstandard"):
            run(tmp_path, [zst])
    else:
        import zstandard

        zst.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zz"}\n'))
        run(tmp_path, [zst])
        assert read_dataset(dataset_prefix(str(tmp_path / "out"), "text"))[1] == [list(b"zz")]


def test_command_line(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.pop(0)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}, {"text": 3}])
    base = ["--input", str(path), "--output-prefix", str(tmp_path / "cli"), "--tokenizer-type",
            "ByteLevelTokenizer", "--append-eod", "--log-interval", "1"]
    assert preprocess_data.main(base) == 0
    err = capsys.readouterr().err
    assert "docs/s" in err and "tokens/s" in err and "MB/s" in err and f"{path}:2: 'text' is int" in err
    assert preprocess_data.main(base + ["--on-error", "fail"]) == 2
    assert "non_string_value" in capsys.readouterr().err


@pytest.mark.parametrize("batch_bytes", [7, 64, 1000])
def test_line_batches_cover_every_line_once_in_order(tmp_path, batch_bytes):
    import random

    from megatron_ext.data.documents import read_line_batches

    rng = random.Random(batch_bytes)
    lines = [bytes(rng.choice(b"ab{}") for _ in range(rng.choice([0, 1, 5, 30, 99, 100, 101, 250])))
             for _ in range(400)] + [b"last"]
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline after the last line
    seen = []
    for batch in read_line_batches([str(path)], max_line_bytes=100, batch_bytes=batch_bytes):
        got = [None] if batch.long_line else batch.lines()
        assert len(got) == batch.num_lines and batch.first_line == len(seen) + 1
        seen.extend(got)
    assert len(seen) == len(lines)
    for got, want in zip(seen, lines):
        # a line over the limit is either dropped unread (None) or handed over whole for the worker to reject
        assert got == want or (got is None and len(want) > 100)


def test_sigterm_mid_run_leaves_no_dataset_and_no_temporary_files(tmp_path, monkeypatch):
    """A real SIGTERM, delivered to this process while the command line tool writes with live workers."""
    import signal

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.pop(0)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus_texts(300)])
    real_add, calls = preprocess_module._Writers.add, []

    def add_then_sigterm(self, key, tokens, lengths):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, in the main thread
        return real_add(self, key, tokens, lengths)

    monkeypatch.setattr(preprocess_module._Writers, "add", add_then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="signal"):
        preprocess_data.main(["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
                              "ByteLevelTokenizer", "--workers", "2", "--log-interval", "0"])
    assert signal.getsignal(signal.SIGTERM) is previous  # the tool restores the handler it replaced
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_keep_partitions_writes_a_blend_that_reads_like_the_merged_dataset(tmp_path):
    texts = corpus_texts(60)
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [{"text": t} for t in texts[i * 20:(i + 1) * 20]])
             for i in range(3)]
    run(tmp_path, files, name="merged")
    run(tmp_path, files, name="kept", partitions=3, keep_partitions=True)
    listing = open(dataset_prefix(str(tmp_path / "kept"), "text") + ".data_path.txt").read().split()
    weights, prefixes = listing[0::2], listing[1::2]
    parts = [read_dataset(p)[1] for p in prefixes]
    assert [sum(map(len, docs)) for docs in parts] == [int(w) for w in weights]
    assert [d for docs in parts for d in docs] == read_dataset(dataset_prefix(str(tmp_path / "merged"), "text"))[1]


@pytest.mark.parametrize("num_files", [1, 3])
def test_keep_partitions_reports_the_datasets_it_wrote_and_always_writes_the_blend(tmp_path, num_files):
    texts = corpus_texts(60)
    size = len(texts) // num_files
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [{"text": t} for t in texts[i * size:(i + 1) * size]])
             for i in range(num_files)]
    summary = run(tmp_path, files, name="kept", partitions=3, keep_partitions=True)
    final = dataset_prefix(str(tmp_path / "kept"), "text")
    listing = open(final + ".data_path.txt").read().split()
    prefixes = listing[1::2]
    assert len(prefixes) == num_files  # never more partitions than files
    assert [d for p in prefixes for d in read_dataset(p)[1]] == [list(t.encode()) for t in texts]
    report = json.load(open(str(tmp_path / "kept") + preprocess_module.REPORT_SUFFIX))
    assert summary.output_prefixes["text"] == report["outputs"]["text"] == prefixes
    assert report["data_path_files"]["text"] == final + ".data_path.txt"
    written = {os.path.join(str(tmp_path), n) for n in os.listdir(tmp_path)}
    for line in summary.report_lines():
        for word in line.split():
            if word.endswith(".bin/.idx"):  # every dataset the summary names exists
                assert {word[:-9] + ".bin", word[:-9] + ".idx"} <= written, line


@pytest.mark.parametrize("batch_bytes", [4096, 1 << 20])
def test_truncated_compressed_file_keeps_its_whole_lines_and_the_next_files(tmp_path, batch_bytes):
    import zlib

    texts = [f"record number {i} " * 20 for i in range(4000)]
    full = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    cut = full[: len(full) * 2 // 3]  # cut off mid-stream
    broken = tmp_path / "a_broken.jsonl.gz"
    broken.write_bytes(cut)
    # every whole line that can be decompressed from the cut file, counted by zlib directly
    readable = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    assert 0 < readable < len(texts)
    after = write_jsonl(tmp_path / "b_after.jsonl", [{"text": "still read"}])
    summary = run(tmp_path, [broken, after], batch_bytes=batch_bytes)
    assert summary.bad.counts.get("unreadable_input") == 1
    (_, line, detail), = summary.bad.samples["unreadable_input"]
    assert "EOFError" in detail
    _, docs = read_dataset(dataset_prefix(str(tmp_path / "out"), "text"))
    kept = [bytes(d).decode() for d in docs[:-1]]
    assert kept == texts[:readable]  # all the whole lines before the cut, in order
    assert line == readable + 1  # reported at the first line that could not be read
    assert docs[-1] == list(b"still read")
    with pytest.raises(InputError, match="unreadable_input"):
        run(tmp_path, [broken, after], name="strict", on_error="fail")


def test_files_equal_a_plain_add_document_loop_byte_for_byte(tmp_path):
    """The batched append equals megatron-core's IndexedDatasetBuilder fed one document at a time."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    texts = corpus_texts(120)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    run(tmp_path, [path], spec=SP, append_eod=True, batch_bytes=8192)
    tok = SP.build()
    builder = IndexedDatasetBuilder(str(tmp_path / "plain.bin"), dtype=DType.optimal_dtype(tok.vocab_size))
    for text in texts:
        ids = tok.tokenize(text) + [tok.eod]
        builder.add_document(np.array(ids), [len(ids)])
    builder.finalize(str(tmp_path / "plain.idx"))
    ours = dataset_prefix(str(tmp_path / "out"), "text")
    for suffix in (".bin", ".idx"):
        assert open(ours + suffix, "rb").read() == open(str(tmp_path / "plain") + suffix, "rb").read()


def test_rerun_with_a_changed_tokenizer_file_does_not_reuse_partials(tmp_path):
    """A tokenizer rewritten in place keeps its paths; its partials must be made again, not reused."""
    from megatron_ext.data.tokenizers import train_byte_level_bpe

    texts = corpus_texts(60)
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [{"text": t} for t in texts[i * 20:(i + 1) * 20]])
             for i in range(3)]
    vocab, merges = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    spec = TokenizerSpec("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    train_byte_level_bpe(texts, 10, vocab, merges)
    run(tmp_path, files, spec=spec, name="kept", partitions=3, keep_partitions=True)
    assert run(tmp_path, files, spec=spec, name="kept", partitions=3, keep_partitions=True).resumed_partitions == 3

    train_byte_level_bpe(texts, 60, vocab, merges)  # same paths, other merges
    summary = run(tmp_path, files, spec=spec, name="kept", partitions=3, keep_partitions=True)
    assert summary.resumed_partitions == 0
    expected = [spec.build().tokenize(t) for t in texts]  # the new tokenizer's ids, straight
    listing = open(dataset_prefix(str(tmp_path / "kept"), "text") + ".data_path.txt").read().split()
    assert [d for p in listing[1::2] for d in read_dataset(p)[1]] == expected
