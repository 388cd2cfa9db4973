"""The training data provider: blends, GCA landmarks, chunk-aligned packing for HSA, collation, mock data."""

import argparse
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_ext.data.preprocess import PreprocessOptions, dataset_prefix, preprocess
from megatron_ext.data.provider import DataConfig, add_data_args, build_train_valid_test_datasets, collate_batch
from megatron_ext.data.tokenizers import ByteLevelTokenizer, TokenizerSpec

ALPHABETS = {"first": "abcdefghijklm ", "second": "nopqrstuvwxyz "}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two byte-level datasets whose texts use disjoint alphabets, so a sample tells which one it came from."""
    d = tmp_path_factory.mktemp("provider")
    rng = random.Random(0)
    prefixes = {}
    for name, alphabet in ALPHABETS.items():
        with open(d / f"{name}.jsonl", "w") as f:
            for _ in range(300):
                text = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 120)))
                f.write(json.dumps({"text": text.strip() or alphabet[0]}) + "\n")
        preprocess(PreprocessOptions(inputs=[str(d / f"{name}.jsonl")], output_prefix=str(d / name),
                                     tokenizer=TokenizerSpec("ByteLevelTokenizer"), append_eod=True,
                                     log_interval=0), log=lambda m: None)
        prefixes[name] = dataset_prefix(str(d / name), "text")
    return prefixes, str(d / "cache")


def documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))]


TOK = ByteLevelTokenizer()


def test_blend_draws_from_its_sources_within_2_percent_of_weights(sources):
    prefixes, cache = sources
    config = DataConfig(seq_length=32, data_path=["30", prefixes["first"], "70", prefixes["second"]],
                        split="90,5,5", data_cache_path=cache)
    train, valid, test = build_train_valid_test_datasets(config, [2000, 40, 40], TOK)
    assert len(train) == 2000 and valid is not None and test is not None
    counts = Counter()
    allowed = {i: set(ALPHABETS[n].encode()) | {TOK.eod} for i, n in enumerate(ALPHABETS)}
    for i in range(len(train)):
        sample = train[i]
        source = int(sample["dataset_id"])
        assert set(sample["tokens"].tolist()) <= allowed[source]  # it really came from that source
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        assert "attention_mask" not in sample  # causal masking is the kernels' job
        counts[source] += 1
    assert abs(counts[0] / 2000 - 0.3) < 0.02 and abs(counts[1] / 2000 - 0.7) < 0.02


def test_gca_landmark_every_chunk_size_minus_one_tokens(sources):
    prefixes, cache = sources
    s, L = 16, 64
    plain = DataConfig(seq_length=L // s * (s - 1), data_path=[prefixes["first"]], split="100,0,0",
                       data_cache_path=cache)
    marked = DataConfig(seq_length=L, data_path=[prefixes["first"]], split="100,0,0", data_cache_path=cache,
                        landmark_chunk_size=s)
    base = build_train_valid_test_datasets(plain, [50, 0, 0], TOK)[0]
    with_lmk = build_train_valid_test_datasets(marked, [50, 0, 0], TOK)[0]
    landmark = TOK.vocab_size
    is_lmk = (torch.arange(L) % s) == s - 1
    for i in range(len(base)):
        a, b = base[i], with_lmk[i]
        assert b["tokens"].shape == (L,)
        assert torch.all(b["tokens"][is_lmk] == landmark) and not torch.any(b["tokens"][~is_lmk] == landmark)
        assert torch.equal(b["tokens"][~is_lmk], a["tokens"])  # text unchanged, in order
        assert torch.equal(b["labels"][~is_lmk], a["labels"])  # text predicts the next *text* token
        assert torch.all(b["loss_mask"][is_lmk] == 0) and torch.equal(b["loss_mask"][~is_lmk], a["loss_mask"])
        assert torch.equal(b["position_ids"], torch.arange(L))


def _segments(sample):
    cu = torch.unique_consecutive(sample["cu_seqlens"].long()).tolist()
    return list(zip(cu[:-1], cu[1:]))


def test_packed_hsa_batches_are_chunk_aligned_and_cover_every_document(sources):
    prefixes, cache = sources
    s, L = 16, 64
    config = DataConfig(seq_length=L, data_path=[prefixes["second"]], split="100,0,0", data_cache_path=cache,
                        pack_chunk_size=s)
    train = build_train_valid_test_datasets(config, [20, 0, 0], TOK)[0]
    docs = documents(prefixes["second"])
    # Read the windows in stream order and rebuild documents from their segments.
    window_of = np.argsort(train.shuffle_index)
    rebuilt, current = [], []
    for w in range(len(train)):
        sample = train[int(window_of[w])]
        tokens, labels, mask = sample["tokens"], sample["labels"], sample["loss_mask"]
        segments = _segments(sample)
        assert segments[0][0] == 0 and segments[-1][1] == L
        for a, b in segments:
            assert a % s == 0 and b % s == 0  # every document segment starts and ends on a chunk boundary
            assert torch.equal(sample["position_ids"][a:b], torch.arange(b - a))
            real = int(mask[a:b].sum().item())
            seg_tokens = tokens[a:b].tolist()
            ends_doc = TOK.eod in seg_tokens
            n = seg_tokens.index(TOK.eod) + 1 if ends_doc else b - a
            current.extend(seg_tokens[:n])
            assert torch.equal(labels[a:a + n - 1], tokens[a + 1:a + n])  # next token of the same document
            assert real == (n - 1 if ends_doc else n)  # the document's last token has no target
            assert torch.all(mask[a + n:b] == 0) and torch.all(tokens[a + n:b] == TOK.eod)  # padding
            assert b - a - n < s  # padding never fills a whole chunk
            if ends_doc:
                rebuilt.append(current)
                current = []
            elif b < L:
                raise AssertionError("a segment that is not the window's last must end its document")
    assert Counter(map(tuple, rebuilt)) <= Counter(map(tuple, docs))  # each document whole, at most once
    assert len(rebuilt) >= len(docs) - 3  # all but those cut off by the last, partial window

    # A second build loads the cached index (memory-mapped) and yields the same samples.
    again = build_train_valid_test_datasets(config, [20, 0, 0], TOK)[0]
    assert isinstance(again.doc_order, np.memmap) and len(again) == len(train)
    for i in (0, len(train) // 2, len(train) - 1):
        assert all(torch.equal(again[i][k], train[i][k]) for k in train[i])

    batch = collate_batch([train[i] for i in range(4)])
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 4 * L and torch.all(cu % s == 0)
    assert torch.all(cu[1:] > cu[:-1]) and batch["max_seqlen"] == (cu[1:] - cu[:-1]).max()
    assert batch["tokens"].shape == (4, L) and batch["loss_mask"].dtype == torch.float32


def test_packing_with_landmarks_keeps_documents_on_chunk_boundaries(sources):
    prefixes, cache = sources
    s, L = 16, 64
    config = DataConfig(seq_length=L, data_path=[prefixes["first"]], split="100,0,0", data_cache_path=cache,
                        pack_chunk_size=s, landmark_chunk_size=s)
    train = build_train_valid_test_datasets(config, [20, 0, 0], TOK)[0]
    is_lmk = (torch.arange(L) % s) == s - 1
    for i in range(10):
        sample = train[i]
        assert torch.all(sample["tokens"][is_lmk] == TOK.vocab_size) and torch.all(sample["loss_mask"][is_lmk] == 0)
        for a, b in _segments(sample):
            assert a % s == 0 and b % s == 0
            assert torch.equal(sample["position_ids"][a:b], torch.arange(b - a))
            assert sample["tokens"][a] != TOK.vocab_size  # a document starts with text, not a landmark


def test_mock_data_and_megatron_arguments():
    parser = add_data_args(argparse.ArgumentParser())
    args = parser.parse_args(["--data-pack-chunk-size", "16"])
    args.seq_length, args.mock_data, args.seed, args.split = 64, True, 7, None
    config = DataConfig.from_args(args)
    assert config.pack_chunk_size == 16 and config.mock_data and config.seed == 7
    train, valid, test = build_train_valid_test_datasets(args, [8, 2, 2], TOK)
    sample = train[0]
    assert sample["tokens"].shape == (64,) and all(a % 16 == 0 for seg in _segments(sample) for a in seg)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="multiple of landmark_chunk_size 16"):
        DataConfig(seq_length=100, mock_data=True, landmark_chunk_size=16)
    with pytest.raises(ValueError, match="--data-path"):
        DataConfig(seq_length=64)


def test_bundled_corpus_feeds_the_provider(tmp_path):
    from megatron_ext.data.corpus import build_demo_data

    prefix, tok = build_demo_data(str(tmp_path))
    assert build_demo_data(str(tmp_path))[0] == prefix  # reused, not rebuilt
    config = DataConfig(seq_length=128, data_path=[prefix], split="98,1,1", data_cache_path=str(tmp_path / "c"))
    train, valid, test = build_train_valid_test_datasets(config, [32, 4, 4], tok)
    batch = collate_batch([train[i] for i in range(8)])
    assert batch["tokens"].shape == (8, 128) and int(batch["tokens"].max()) < tok.vocab_size
    assert "attention_mask" not in batch
    text = tok.detokenize(batch["tokens"][0].tolist())
    assert any(name in text for name in ("Mira", "Tomas", "Ada", "plus", "Dear", "asked"))  # real corpus text


def test_landmark_vocabulary_requirement():
    config = DataConfig(seq_length=64, mock_data=True, landmark_chunk_size=16)
    assert config.required_vocab_size(TOK) == TOK.vocab_size + 1
    assert DataConfig(seq_length=64, mock_data=True, landmark_chunk_size=16,
                      landmark_token_id=3).required_vocab_size(TOK) == TOK.vocab_size
    assert DataConfig(seq_length=64, mock_data=True).required_vocab_size(TOK) == TOK.vocab_size


def test_packed_batch_feeds_hsa_retrieval_without_crossing_documents(sources):
    """The contract with the kernels: a collated packed batch, flattened to B = 1, drives hsa_retrieval."""
    from megatron_ext.kernels.hsa import hsa_retrieval_reference

    prefixes, cache = sources
    s, L, B = 16, 64, 3
    config = DataConfig(seq_length=L, data_path=[prefixes["first"]], split="100,0,0", data_cache_path=cache,
                        pack_chunk_size=s)
    train = build_train_valid_test_datasets(config, [10, 0, 0], TOK)[0]
    batch = collate_batch([train[i] for i in range(B)])
    cu = batch["cu_seqlens"]
    total, chunks, topk = B * L, B * L // s, 4
    gen = torch.Generator().manual_seed(0)
    indices, weights = hsa_retrieval_reference(torch.randn(1, total, 1, 8, generator=gen),
                                               torch.randn(1, chunks, 1, 8, generator=gen),
                                               chunk_size=s, topk=topk, cu_seqlens=cu)
    doc_of = lambda pos: int(torch.searchsorted(cu.long(), torch.tensor(pos), right=True)) - 1  # noqa: E731
    for t in range(total):
        chosen = [int(c) for c in indices[0, t, 0] if c >= 0]
        eligible = [c for c in range(chunks) if (c + 1) * s <= t and doc_of(c * s) == doc_of(t)]
        assert set(chosen) <= set(eligible) and len(chosen) == min(topk, len(eligible))
    assert any(len([c for c in indices[0, t, 0] if c >= 0]) for t in range(total))  # retrieval did happen


def test_insert_landmarks_against_an_explicit_loop():
    from megatron_ext.data.landmarks import insert_landmarks

    s, eod, lmk = 4, 9, 99
    text = torch.tensor([1, 2, 9, 3, 4, 5, 9, 6, 7])  # 3 chunks of 3 text tokens, EODs inside
    labels = torch.tensor([2, 9, 3, 4, 5, 9, 6, 7, 8])
    loss_mask = torch.tensor([1.0, 1, 0, 1, 1, 1, 0, 1, 1])
    out = insert_landmarks({"tokens": text, "labels": labels, "loss_mask": loss_mask,
                            "position_ids": torch.arange(9)}, s, lmk, eod, reset_position_ids=True)
    tokens, want_labels, want_mask, want_pos = [], [], [], []
    pos = 0
    for i in range(9):
        tokens.append(int(text[i]))
        want_labels.append(int(labels[i]))
        want_mask.append(float(loss_mask[i]))
        want_pos.append(pos)
        pos = 0 if int(text[i]) == eod else pos + 1
        if i % 3 == 2:  # a landmark closes the chunk: no loss, its label is the next text token
            tokens.append(lmk)
            want_labels.append(int(labels[i]))
            want_mask.append(0.0)
            want_pos.append(pos)
            pos += 1
    assert out["tokens"].tolist() == tokens and out["labels"].tolist() == want_labels
    assert out["loss_mask"].tolist() == want_mask and out["position_ids"].tolist() == want_pos


def _megatron_args(argv, seq_length=32):
    """Megatron-LM's own data flags (its parser, not a copy) plus ours."""
    from megatron.training.arguments import _add_data_args

    args = add_data_args(_add_data_args(argparse.ArgumentParser())).parse_args(argv)
    args.seq_length, args.seed, args.mock_data = seq_length, 1234, False
    return args


def test_data_args_path_reads_the_blend_from_a_file(sources, tmp_path):
    prefixes, cache = sources
    blend = ["30", prefixes["first"], "70", prefixes["second"]]
    (tmp_path / "blend.txt").write_text(" ".join(blend) + "\n")
    common = ["--split", "90,5,5", "--data-cache-path", cache]
    from_file = build_train_valid_test_datasets(
        _megatron_args(["--data-args-path", str(tmp_path / "blend.txt")] + common), [200, 10, 10], TOK)[0]
    direct = build_train_valid_test_datasets(_megatron_args(["--data-path", *blend] + common), [200, 10, 10], TOK)[0]
    assert len(from_file) == len(direct) == 200
    for i in range(0, 200, 7):  # the same blend as the list given on the command line
        assert torch.equal(from_file[i]["tokens"], direct[i]["tokens"])
        assert int(from_file[i]["dataset_id"]) == int(direct[i]["dataset_id"])


def test_per_split_data_args_path_gives_each_split_its_own_data(sources, tmp_path):
    prefixes, cache = sources
    (tmp_path / "splits.json").write_text(json.dumps(
        {"train": prefixes["first"], "valid": prefixes["second"], "test": prefixes["second"]}))
    args = _megatron_args(["--per-split-data-args-path", str(tmp_path / "splits.json"), "--data-cache-path", cache])
    train, valid, test = build_train_valid_test_datasets(args, [50, 10, 10], TOK)
    letters = {n: set(ALPHABETS[n].encode()) | {TOK.eod} for n in ALPHABETS}
    assert all(set(train[i]["tokens"].tolist()) <= letters["first"] for i in range(len(train)))
    assert all(set(ds[i]["tokens"].tolist()) <= letters["second"] for ds in (valid, test) for i in range(len(ds)))


@pytest.mark.parametrize("flag, mmap", [([], True), (["--no-mmap-bin-files"], False)])
def test_no_mmap_bin_files_reaches_the_indexed_dataset(sources, flag, mmap):
    prefixes, cache = sources
    args = _megatron_args(["--data-path", prefixes["first"], "--split", "90,5,5", "--data-cache-path", cache] + flag)
    train = build_train_valid_test_datasets(args, [20, 2, 2], TOK)[0]
    assert train.dataset.mmap is mmap  # the IndexedDataset under the GPTDataset
    assert train[0]["tokens"].shape == (32,)
