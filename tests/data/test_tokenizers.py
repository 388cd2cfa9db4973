"""Tokenizers: lossless round trips, GPT-2 BPE against an independent merge oracle, clear errors."""

import builtins
import json
import pytest

from megatron_ext.data.corpus import CORPUS_FILE, TOKENIZER_MODEL
from megatron_ext.data.tokenizers import (
    ByteLevelTokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
    build_tokenizer,
    bytes_to_unicode,
    train_byte_level_bpe,
)

SAMPLES = ["Mira put a brass key in the blue box.", "  two  spaces\n\nand newlines", "ünïcödé 😀 €5 — done",
           "x", "it's 1234 o'clock; we'll see_it"]


def test_byte_level_is_utf8_bytes():
    tok = ByteLevelTokenizer()
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.detokenize(ids + [tok.eod]) == text  # EOD is dropped when decoding
    assert (tok.vocab_size, tok.eod, tok.pad) == (258, 256, 257)


def test_bundled_sentencepiece_round_trips_any_text():
    tok = build_tokenizer("SentencePieceTokenizer", TOKENIZER_MODEL)
    assert tok.vocab_size == 512 and tok.eod == 2 and tok.pad == 3
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text  # identity normalization + byte fallback: lossless
    assert tok.tokenize_batch(SAMPLES) == [tok.tokenize(t) for t in SAMPLES]
    # trained on the corpus: its text is compressed well below one token per byte
    with open(CORPUS_FILE) as f:
        text = json.loads(f.readline())["text"]
    assert len(tok.tokenize(text)) < 0.4 * len(text.encode())


def _sequential_merge_oracle(word, merges):
    """Apply every merge in rank order over the whole word: equal to lowest-rank-first BPE for trained merges."""
    enc = bytes_to_unicode()
    parts = [enc[b] for b in word.encode()]
    for a, b in merges:
        out, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    with open(CORPUS_FILE) as f:
        texts = [json.loads(line)["text"] for line in f][:200]
    d = tmp_path_factory.mktemp("gpt2")
    train_byte_level_bpe(texts, 120, str(d / "vocab.json"), str(d / "merges.txt"))
    vocab = json.loads((d / "vocab.json").read_text())
    lines = (d / "merges.txt").read_text().splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines]
    assert len(merges) == 120 and len(vocab) == 256 + len(set(a + b for a, b in merges)) + 1
    return str(d / "vocab.json"), str(d / "merges.txt"), vocab, merges


def test_gpt2_bpe_matches_merge_oracle_and_round_trips(gpt2_files):
    vocab_file, merge_file, vocab, merges = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    assert tok.eod == vocab["<|endoftext|>"] and tok.vocab_size == len(vocab)
    with open(CORPUS_FILE) as f:
        texts = [json.loads(line)["text"] for line in f][300:320] + SAMPLES
    for text in texts:
        ids = tok.tokenize(text)
        expected = [vocab[p] for w in tok._split.findall(text) for p in _sequential_merge_oracle(w, merges)]
        assert ids == expected
        assert tok.detokenize(ids) == text
    # the merges do compress: trained words become single tokens
    assert len(tok.tokenize(" the")) == 1


def test_gpt2_bpe_pre_split_keeps_spaces_with_words():
    from megatron_ext.data.tokenizers import _gpt2_splitter

    split = _gpt2_splitter()
    assert split.findall("Hello world, it's 42_x  !") == ["Hello", " world", ",", " it", "'s", " 42", "_", "x", " ",
                                                          " !"]


def test_hf_tokenizer_clear_error_without_library(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    real_import = builtins.__import__

    def no_hf(name, *args, **kwargs):
        if name in ("tokenizers", "transformers") or name.startswith(("tokenizers.", "transformers.")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hf)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HuggingFaceTokenizer(str(tmp_path / "tokenizer.json"))


def test_hf_tokenizer_with_local_tokenizers_library(hf_tokenizer_json):
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(hf_tokenizer_json)
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_json)
    assert tok.eod == hf.token_to_id("<|endoftext|>") and tok.vocab_size == hf.get_vocab_size()
    for text in SAMPLES:
        assert tok.tokenize(text) == hf.encode(text, add_special_tokens=False).ids
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.tokenize_batch(SAMPLES) == [tok.tokenize(t) for t in SAMPLES]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'Foo'"):
        build_tokenizer("Foo")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(FileNotFoundError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=TOKENIZER_MODEL, merge_file=None)
    with pytest.raises(TypeError, match="cannot tokenize text"):
        NullTokenizer(100).tokenize("x")


def test_sentencepiece_matches_megatron_cores_own_wrapper():
    """Datasets written with our tokenizer read the same under megatron-core's tokenizer (as pretrain uses)."""
    from megatron.core.tokenizers import MegatronTokenizer

    theirs = MegatronTokenizer.from_pretrained(tokenizer_path=TOKENIZER_MODEL,
                                               metadata_path={"library": "sentencepiece"})
    ours = build_tokenizer("SentencePieceTokenizer", TOKENIZER_MODEL)
    assert (ours.vocab_size, ours.eod, ours.pad) == (theirs.vocab_size, theirs.eod, theirs.pad)
    with open(CORPUS_FILE) as f:
        texts = [json.loads(line)["text"] for line in f][:50] + SAMPLES
    for text in texts:
        assert ours.tokenize(text) == theirs.tokenize(text)


def test_gpt2_bpe_equals_hugging_face_on_the_same_files(hf_tokenizer_json, tmp_path):
    """Our plain-Python byte-level BPE against the `tokenizers` library, given the same vocab.json/merges.txt."""
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(hf_tokenizer_json)
    hf.model.save(str(tmp_path))  # writes vocab.json and merges.txt in GPT-2's format
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                           merge_file=str(tmp_path / "merges.txt"))
    with open(CORPUS_FILE) as f:
        texts = [json.loads(line)["text"] for line in f][200:260] + SAMPLES
    for text in texts:
        assert ours.tokenize(text) == hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("eos", ["<|eot_id|>", {"content": "<|eot_id|>", "lstrip": False, "special": True}])
def test_hf_end_of_document_is_the_eos_token_of_tokenizer_config(tmp_path, eos):
    from megatron_ext.data.tokenizers import eos_token_name

    (tmp_path / "tokenizer.json").write_text("{}")
    assert eos_token_name(str(tmp_path / "tokenizer.json")) is None  # no tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": eos}))
    assert eos_token_name(str(tmp_path / "tokenizer.json")) == "<|eot_id|>"
    assert eos_token_name(str(tmp_path)) == "<|eot_id|>"  # a tokenizer directory
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    assert eos_token_name(str(tmp_path)) is None


def test_hf_tokenizer_takes_eod_from_tokenizer_config(hf_tokenizer_json, tmp_path):
    """A vocab holding both <|endoftext|> and the configured <|eot_id|>: the config decides."""
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(hf_tokenizer_json)
    hf.add_special_tokens(["<|eot_id|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tokenizer.json"))
    assert tok.eod == hf.token_to_id("<|eot_id|>") != hf.token_to_id("<|endoftext|>")
    (tmp_path / "tokenizer_config.json").unlink()  # without the config: the usual names, in order
    assert build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tokenizer.json")).eod == hf.token_to_id(
        "<|endoftext|>")
