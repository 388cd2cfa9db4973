"""Fixtures shared by the data tests."""

import json

import pytest

from megatron_ext.data.corpus import CORPUS_FILE


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained locally with the `tokenizers` library (skips without it)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    with open(CORPUS_FILE) as f:
        texts = [json.loads(line)["text"] for line in f][:100]
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    hf.save(str(path))
    return str(path)
