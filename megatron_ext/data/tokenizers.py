"""Text tokenizers for preprocessing and for the training datasets.

Every tokenizer here offers what megatron-core's datasets read from a tokenizer (``vocab_size``, ``eod``, ``pad``,
``unique_identifiers``) plus ``tokenize(text) -> list[int]``, ``tokenize_batch(texts)`` and ``detokenize(ids)``.
They are light (no torch import) so that preprocessing workers start fast.

Types, named as Megatron-LM's ``--tokenizer-type``:

- ``ByteLevelTokenizer``: UTF-8 bytes are the ids 0..255, EOD = 256, PAD = 257; needs no files.
- ``SentencePieceTokenizer``: ``--tokenizer-model`` is a ``.model`` file (the ``sentencepiece`` package).
- ``HuggingFaceTokenizer``: ``--tokenizer-model`` is a ``tokenizer.json`` file (read by the ``tokenizers``
  package) or a local directory (read by ``transformers``); either package must be importable.
- ``GPT2BPETokenizer``: byte-level BPE from ``--vocab-file`` (vocab.json) and ``--merge-file`` (merges.txt),
  implemented here in plain Python (the ``regex`` package, when importable, gives the exact GPT-2 pre-split).
- ``NullTokenizer``: ``--vocab-size`` ids with EOD = vocab_size - 1, for mock data; it cannot read text.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Iterable, List, Optional, Sequence

import numpy as np

TOKENIZER_TYPES = (
    "ByteLevelTokenizer",
    "SentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
)


class TextTokenizer:
    """Common interface. Subclasses set ``vocab_size``, ``eod``, ``pad`` and implement ``tokenize``."""

    vocab_size: int
    eod: int
    pad: int

    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """What identifies this tokenizer in megatron-core's dataset cache keys."""
        return OrderedDict(self._identity())

    def _identity(self) -> dict:
        return {"class": type(self).__name__, "vocab_size": self.vocab_size}


class ByteLevelTokenizer(TextTokenizer):
    """UTF-8 bytes as ids 0..255; EOD = 256, PAD = 257 (so vocab_size = 258). Lossless for any text."""

    def __init__(self) -> None:
        self.vocab_size = 258
        self.eod = 256
        self.pad = 257

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def tokenize_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        """Arrays, not lists: preprocessing concatenates them without a Python-level loop over bytes."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def detokenize(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(TextTokenizer):
    """A SentencePiece ``.model``; EOD is the model's EOS piece (or ``</s>``)."""

    def __init__(self, model_path: str) -> None:
        if not model_path or not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"SentencePieceTokenizer needs --tokenizer-model pointing to a .model file; got {model_path!r}"
            )
        try:
            import sentencepiece
        except ImportError as err:  # pragma: no cover - sentencepiece is a declared dependency
            raise ImportError(
                "SentencePieceTokenizer needs the `sentencepiece` package: pip install sentencepiece"
            ) from err
        self.model_path = os.path.abspath(model_path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        self.vocab_size = self._sp.get_piece_size()
        eos = self._sp.eos_id()
        if eos < 0:
            eos = self._sp.piece_to_id("</s>")
            if eos == self._sp.unk_id():
                raise ValueError(f"{model_path}: the model has no EOS piece to use as end-of-document")
        self.eod = eos
        self.pad = self._sp.pad_id()  # -1 when the model has none: megatron-core then pads with -1 too

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # One thread: parallelism comes from preprocessing workers (sentencepiece would use every core).
        return self._sp.encode(list(texts), num_threads=1)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def _identity(self) -> dict:
        return {"class": type(self).__name__, "model": self.model_path, "vocab_size": self.vocab_size}


def eos_token_name(path: str) -> Optional[str]:
    """The ``eos_token`` of the ``tokenizer_config.json`` in the tokenizer directory ``path`` (or beside the
    tokenizer.json file ``path``): a string or ``{"content": ...}``; None without the file or the entry."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_file = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


class HuggingFaceTokenizer(TextTokenizer):
    """A Hugging Face tokenizer read from local files; special tokens are not added (EOD comes from --append-eod)."""

    def __init__(self, path: str) -> None:
        if not path or not os.path.exists(path):
            raise FileNotFoundError(
                f"HuggingFaceTokenizer needs --tokenizer-model pointing to a local tokenizer.json file or a "
                f"tokenizer directory; got {path!r}"
            )
        self.path = os.path.abspath(path)
        self._fast = None
        self._auto = None
        json_file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
        try:
            import tokenizers

            if os.path.isfile(json_file):
                self._fast = tokenizers.Tokenizer.from_file(json_file)
        except ImportError:
            pass
        if self._fast is None:
            try:
                from transformers import AutoTokenizer
            except ImportError as err:
                raise ImportError(
                    "HuggingFaceTokenizer needs the `tokenizers` package (for a tokenizer.json file) or "
                    "`transformers` (for a tokenizer directory), and neither is importable: "
                    "pip install tokenizers"
                ) from err
            self._auto = AutoTokenizer.from_pretrained(path)
        if self._fast is not None:
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
            vocab = self._fast.get_vocab(with_added_tokens=True)
            # The eos_token of tokenizer_config.json first (models whose vocab holds several of the usual names,
            # e.g. Llama 3's <|end_of_text|> and <|eot_id|>, say there which one ends a document).
            named = eos_token_name(path)
            guesses = ([named] if named else []) + ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
            eod = next((vocab[t] for t in guesses if t in vocab), None)
            pad = next((vocab[t] for t in ("<pad>", "<|pad|>", "[PAD]") if t in vocab), None)
        else:
            self.vocab_size = len(self._auto)
            eod, pad = self._auto.eos_token_id, self._auto.pad_token_id
        self._eod = eod
        self.pad = -1 if pad is None else pad

    @property
    def eod(self) -> int:
        if self._eod is None:
            raise ValueError(f"{self.path}: the tokenizer defines no end-of-text token to use as EOD")
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self._auto.encode(text, add_special_tokens=False)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._auto.decode(ids)

    def _identity(self) -> dict:
        return {"class": type(self).__name__, "path": self.path, "vocab_size": self.vocab_size}


def bytes_to_unicode() -> dict:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Bytes that are printable Latin-1 characters map to themselves; the other 68 map, in byte order, to the
    characters from U+0100 on, so that no byte becomes whitespace or a control character.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# GPT-2's pre-split: contractions, letter runs, digit runs, other-symbol runs (each with one optional leading
# space), then whitespace. Without `regex`, \p{L} and \p{N} are approximated with `re` classes (they differ only
# for rare numeric characters such as superscripts, which `re` counts as letters).
_GPT2_SPLIT_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_SPLIT_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


def _gpt2_splitter():
    try:
        import regex

        return regex.compile(_GPT2_SPLIT_REGEX)
    except ImportError:
        return re.compile(_GPT2_SPLIT_RE)


class GPT2BPETokenizer(TextTokenizer):
    """Byte-level BPE (GPT-2 format): vocab.json maps token strings to ids, merges.txt lists merges by rank."""

    def __init__(self, vocab_file: str, merge_file: str, eod_token: str = "<|endoftext|>") -> None:
        for flag, f in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not f or not os.path.isfile(f):
                raise FileNotFoundError(f"GPT2BPETokenizer needs {flag} pointing to an existing file; got {f!r}")
        self.vocab_file, self.merge_file = os.path.abspath(vocab_file), os.path.abspath(merge_file)
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder = json.load(f)
        self.decoder = {v: k for k, v in self.encoder.items()}
        merges = []
        with open(merge_file, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line or line.startswith("#version"):
                    continue
                a, b = line.split(" ")
                merges.append((a, b))
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._split = _gpt2_splitter()
        self.vocab_size = len(self.encoder)
        if eod_token not in self.encoder:
            raise ValueError(f"{vocab_file}: no {eod_token!r} entry to use as end-of-document")
        self.eod = self.encoder[eod_token]
        self.pad = -1
        self._word_ids = lru_cache(maxsize=1 << 16)(self._encode_word)

    def _bpe(self, word: str) -> List[str]:
        """Merge the lowest-ranked adjacent pair until no pair has a rank."""
        parts = list(word)
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                rank = self.merge_ranks.get((parts[i], parts[i + 1]))
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = i, rank
            if best is None:
                break
            pair = (parts[best], parts[best + 1])
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of that pair, left to right
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _encode_word(self, word: str) -> tuple:
        mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        try:
            return tuple(self.encoder[p] for p in self._bpe(mapped))
        except KeyError as err:
            raise ValueError(f"{self.vocab_file}: BPE piece {err.args[0]!r} has no id (vocab and merges disagree)")

    def tokenize(self, text: str) -> List[int]:
        ids: List[int] = []
        for word in self._split.findall(text):
            ids.extend(self._word_ids(word))
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    def _identity(self) -> dict:
        return {"class": type(self).__name__, "vocab": self.vocab_file, "merges": self.merge_file}


def train_byte_level_bpe(texts: Iterable[str], num_merges: int, vocab_file: str, merge_file: str,
                         eod_token: str = "<|endoftext|>") -> None:
    """Train a small GPT-2-format byte-level BPE (vocab.json + merges.txt) on texts, with no downloads.

    Plain and slow (it recounts pairs after every merge): meant for tests, demos and benchmarks on small text.
    Words come from GPT-2's pre-split; each step merges the most frequent adjacent pair (ties: the larger pair).
    """
    from collections import Counter

    enc = bytes_to_unicode()
    split = _gpt2_splitter()
    counts = Counter("".join(enc[b] for b in w.encode("utf-8")) for t in texts for w in split.findall(t))
    words = {w: list(w) for w in counts}
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, n in counts.items():
            parts = words[w]
            for pair in zip(parts, parts[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for w in counts:
            parts, merged, i = words[w], [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            words[w] = merged
    vocab = {c: i for i, c in enumerate(enc.values())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[eod_token] = len(vocab)
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merge_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)


class NullTokenizer(TextTokenizer):
    """Ids only (mock data): ``vocab_size`` ids, EOD = vocab_size - 1."""

    def __init__(self, vocab_size: int) -> None:
        if not vocab_size or vocab_size < 2:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 2; got {vocab_size!r}")
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1
        self.pad = -1

    def tokenize(self, text: str) -> List[int]:
        raise TypeError("NullTokenizer cannot tokenize text: choose a text tokenizer with --tokenizer-type")

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to rebuild a tokenizer in another process (the tokenizer objects need not pickle)."""

    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None

    def build(self) -> TextTokenizer:
        return build_tokenizer(**asdict(self))


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    vocab_size: Optional[int] = None,
) -> TextTokenizer:
    """Build a tokenizer from Megatron-LM-style options (``--tokenizer-type`` and its file flags)."""
    if tokenizer_type == "ByteLevelTokenizer":
        return ByteLevelTokenizer()
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def build_tokenizer_from_args(args) -> TextTokenizer:
    """Build from an argparse namespace carrying Megatron-LM's tokenizer flag names."""
    return TokenizerSpec(
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=getattr(args, "tokenizer_model", None),
        vocab_file=getattr(args, "vocab_file", None),
        merge_file=getattr(args, "merge_file", None),
        vocab_size=getattr(args, "vocab_size", None),
    ).build()
