"""Synthetic long-context tasks: exact lengths, answers that follow from the text, training/eval plumbing."""

import random
import re

import pytest
import torch

from megatron_ext.data.corpus import TOKENIZER_MODEL
from megatron_ext.data.provider import DataConfig, build_train_valid_test_datasets
from megatron_ext.data.synthetic import (
    TASKS,
    iter_task_samples,
    make_sample,
    parse_variable_chains,
    write_task_dataset,
)
from megatron_ext.data.tokenizers import ByteLevelTokenizer, build_tokenizer

TOKENIZERS = {"bytes": ByteLevelTokenizer(), "sp": build_tokenizer("SentencePieceTokenizer", TOKENIZER_MODEL)}


def answer_from_text(task, prompt):
    """The oracle: what the answer must be, read from the decoded prompt alone."""
    question = prompt[prompt.rindex("?") - 120:]
    if task == "passkey":
        keys = set(re.findall(r"The pass key is (\d+)\.", prompt))
        assert len(keys) == 1
        return f"{keys.pop()}."
    if task == "multikey":
        word = re.search(r"magic number for (\w+)\?", question).group(1)
        values = re.findall(rf"magic numbers for {word} is: (\d+)\.", prompt)
        assert len(values) == 1
        return f"{values[0]}."
    if task == "multivalue":
        word = re.search(r"magic numbers for (\w+)\?", question).group(1)
        return ", ".join(re.findall(rf"magic numbers for {word} is: (\d+)\.", prompt)) + "."
    value = re.search(r"assigned the value (\d+)\?", question).group(1)
    chains = parse_variable_chains(prompt)
    order = re.findall(r"VAR ([A-Z]+) = ", prompt)
    return " ".join(v for v in order if chains.get(v) == value) + "."


@pytest.mark.parametrize("tokenizer", list(TOKENIZERS), ids=list(TOKENIZERS))
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [700, 3000])
def test_samples_have_exact_length_and_answers_that_follow_from_the_text(task, tokenizer, length):
    tok = TOKENIZERS[tokenizer]
    rng = random.Random(length)
    for _ in range(3):
        sample = make_sample(task, tok, length, rng, num_needles=3, hops=3)
        assert len(sample.tokens) == length and sample.tokens[-1] == tok.eod
        prompt = tok.detokenize(sample.tokens[: sample.answer_start])
        answer = tok.detokenize(sample.tokens[sample.answer_start:-1]).strip()
        assert answer == sample.answer == answer_from_text(task, prompt)
        assert all(0 <= d <= 1 for d in sample.depths) and sample.depths == sorted(sample.depths)


def test_passkey_depth_is_where_asked():
    tok = TOKENIZERS["bytes"]
    for depth in (0.1, 0.5, 0.9):
        sample = make_sample("passkey", tok, 4000, random.Random(0), depth=depth)
        assert abs(sample.depths[0] - depth) < 0.05


def test_too_short_length_names_the_minimum():
    with pytest.raises(ValueError, match="needs at least"):
        make_sample("variable_tracking", TOKENIZERS["bytes"], 100, random.Random(0))


def test_written_dataset_trains_one_task_per_packed_sample(tmp_path):
    tok = TOKENIZERS["sp"]
    prefix = write_task_dataset(str(tmp_path / "passkey"), "passkey", tok, length=512, num_samples=6)
    records = list(iter_task_samples(prefix))
    assert len(records) == 6
    for prompt, answer, record in records:
        assert len(prompt) == record["answer_start"] and tok.detokenize(answer).strip() == record["answer"]
    assert [r["depths"][0] for _, _, r in records] == sorted(r["depths"][0] for _, _, r in records)
    config = DataConfig(seq_length=512, data_path=[prefix], split="100,0,0", data_cache_path=str(tmp_path / "c"),
                        pack_chunk_size=64)
    train = build_train_valid_test_datasets(config, [6, 0, 0], tok)[0]
    documents = {tuple(p.tolist() + a.tolist()) for p, a, _ in records}
    for i in range(len(train)):
        sample = train[i]
        assert torch.equal(torch.unique_consecutive(sample["cu_seqlens"]), torch.tensor([0, 512], dtype=torch.int32))
        assert tuple(sample["tokens"][:-1].tolist()) in documents  # one whole task (its EOD has no target)


def test_command_line(tmp_path, capsys):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    try:
        import make_synthetic_data
    finally:
        sys.path.pop(0)
    base = ["--task", "multikey", "--num-samples", "2", "--tokenizer-type", "ByteLevelTokenizer",
            "--output-prefix", str(tmp_path / "mk")]
    assert make_synthetic_data.main(base + ["--seq-length", "1500"]) == 0
    records = list(iter_task_samples(str(tmp_path / "mk")))
    assert len(records) == 2 and all(len(p) + len(a) + 1 == 1500 for p, a, _ in records)
    assert make_synthetic_data.main(base + ["--seq-length", "50"]) == 2
    assert "needs at least" in capsys.readouterr().err
