"""Synthetic long-context retrieval tasks, generated at any length straight to indexed datasets.

Tasks (needles hidden in a haystack of procedural filler sentences from the bundled corpus generator):

- ``passkey``: one pass key (a 5-digit number) at a chosen depth; answer the key.
- ``multikey``: several "special magic number for <word>" needles with distinct words; answer one word's number.
- ``multivalue``: one word with several numbers at different depths; answer all of them in order of appearance.
- ``variable_tracking``: chains ``VAR A = 12345.`` ``VAR B = VAR A.`` ... spread over the context, plus
  distractor chains; answer every variable that holds the queried value.

Each sample is one document of exactly ``length`` tokens: prompt (haystack + question) then answer, then EOD.
It is built from separately tokenized pieces, so the length is exact for any tokenizer. Alongside
``{prefix}.bin/.idx`` goes ``{prefix}.answers.jsonl``: per sample the task, the answer text, ``answer_start``
(the token offset where the answer begins, so evaluation scores tokens ``[answer_start, length - 1)``) and the
needle depths. Packed training with ``seq_length == length`` (a multiple of the chunk size) makes each training
sample exactly one task.
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

TASKS = ("passkey", "multikey", "multivalue", "variable_tracking")


@dataclass
class TaskSample:
    tokens: List[int]  # prompt + answer (+ EOD): exactly the requested length
    answer_start: int
    answer: str
    task: str
    depths: List[float] = field(default_factory=list)  # relative positions of the needles in the haystack


class _Pieces:
    """Tokenized text pieces, cached (filler sentences repeat)."""

    def __init__(self, tokenizer, seed: int) -> None:
        from megatron_ext.data.corpus.generate import NAMES, _sentence_filler

        self.tokenizer = tokenizer
        # SentencePiece-like tokenizers put a word boundary before every piece themselves: no leading space then.
        pair = list(tokenizer.tokenize("a")) + list(tokenizer.tokenize("b"))
        self.drop_leading_space = tokenizer.detokenize(pair) == "a b"
        rng = random.Random(seed)
        self.filler = [self.encode(" " + _sentence_filler(rng, rng.choice(NAMES))) for _ in range(256)]
        if min(map(len, self.filler)) == 0:
            raise ValueError("the tokenizer turns filler sentences into no tokens")

    def encode(self, text: str) -> List[int]:
        if self.drop_leading_space and text.startswith(" "):
            text = text[1:]
        return list(self.tokenizer.tokenize(text))


def _number(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _word(rng: random.Random, taken: set) -> str:
    while True:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 8)))
        if w not in taken:
            taken.add(w)
            return w


def _var(rng: random.Random, taken: set) -> str:
    while True:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in taken:
            taken.add(v)
            return v


def _needles(task: str, rng: random.Random, num_needles: int, hops: int) -> Tuple[str, List[str], str, str]:
    """(intro, needles in order of appearance, question, answer text)."""
    if task == "passkey":
        key = _number(rng)
        return ("There is a pass key hidden in the text below. Find it and remember it.",
                [f" The pass key is {key}. Remember it. {key} is the pass key."],
                " What is the pass key? The pass key is", f" {key}.")
    if task == "multikey":
        taken: set = set()
        pairs = [(_word(rng, taken), _number(rng)) for _ in range(max(2, num_needles))]
        word, value = rng.choice(pairs)
        return ("Some special magic numbers are hidden in the text below. Remember them.",
                [f" One of the special magic numbers for {w} is: {v}." for w, v in pairs],
                f" What is the special magic number for {word}? The special magic number for {word} is:",
                f" {value}.")
    if task == "multivalue":
        word = _word(rng, set())
        values = [_number(rng) for _ in range(max(2, num_needles))]
        return ("Some special magic numbers are hidden in the text below. Remember them.",
                [f" One of the special magic numbers for {word} is: {v}." for v in values],
                f" What are all the special magic numbers for {word}? The special magic numbers for {word} are:",
                " " + ", ".join(values) + ".")
    if task == "variable_tracking":
        taken = set()
        value = _number(rng)
        chains = [[_var(rng, taken) for _ in range(hops)] for _ in range(max(1, num_needles))]
        values = [value] + [_number(rng) for _ in chains[1:]]
        steps = []  # interleave the chains, keeping each chain's order
        for level in range(hops):
            for chain, v in zip(chains, values):
                src = v if level == 0 else f"VAR {chain[level - 1]}"
                steps.append(f" VAR {chain[level]} = {src}.")
        return ("Memorize and track the chain(s) of variable assignment hidden in the text below.",
                steps, f" Which variables are assigned the value {value}? They are:",
                " " + " ".join(chains[0]) + ".")
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def make_sample(task: str, tokenizer, length: int, rng: random.Random, pieces: Optional[_Pieces] = None,
                num_needles: int = 4, hops: int = 4, depth: Optional[float] = None,
                append_eod: bool = True) -> TaskSample:
    """One sample of exactly ``length`` tokens. ``depth`` (0..1) places a single needle (passkey); otherwise
    needles go at sorted random depths."""
    pieces = pieces or _Pieces(tokenizer, rng.randint(0, 1 << 30))
    intro, needles, question, answer = _needles(task, rng, num_needles, hops)
    intro_ids, question_ids, answer_ids = pieces.encode(intro), pieces.encode(question), pieces.encode(answer)
    needle_ids = [pieces.encode(n) for n in needles]
    fixed = len(intro_ids) + sum(map(len, needle_ids)) + len(question_ids) + len(answer_ids) + int(append_eod)
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"{task}: length {length} is too short; it needs at least {fixed} tokens with this "
                         f"tokenizer (fewer needles/hops, or a longer length)")
    haystack: List[List[int]] = []
    used = 0
    while True:
        sentence = pieces.filler[rng.randrange(len(pieces.filler))]
        if used + len(sentence) > budget:
            if budget - used:
                haystack.append(sentence[: budget - used])  # a cut sentence fills the exact length
            break
        haystack.append(sentence)
        used += len(sentence)
    starts = np.cumsum([0] + [len(s) for s in haystack])
    if depth is not None and len(needles) == 1:
        depths = [float(depth)]
    else:
        depths = sorted(rng.random() for _ in needles)
    slots = [int(np.searchsorted(starts, d * budget, side="right")) - 1 if budget else 0 for d in depths]
    slots = [max(0, min(s, len(haystack))) for s in slots]
    body: List[int] = list(intro_ids)
    needle_at = []
    next_needle = 0
    for i in range(len(haystack) + 1):
        while next_needle < len(needle_ids) and slots[next_needle] == i:
            needle_at.append(len(body))
            body.extend(needle_ids[next_needle])
            next_needle += 1
        if i < len(haystack):
            body.extend(haystack[i])
    body.extend(question_ids)
    answer_start = len(body)
    tokens = body + answer_ids + ([tokenizer.eod] if append_eod else [])
    assert len(tokens) == length, (len(tokens), length)
    return TaskSample(tokens=tokens, answer_start=answer_start, answer=answer.strip(), task=task,
                      depths=[round(p / max(1, answer_start), 4) for p in needle_at])


def write_task_dataset(output_prefix: str, task: str, tokenizer, length: int, num_samples: int, seed: int = 1234,
                       num_needles: int = 4, hops: int = 4, append_eod: bool = True) -> str:
    """Write ``num_samples`` samples to ``{output_prefix}.bin/.idx`` + ``.answers.jsonl``; returns the prefix.

    Passkey depths sweep evenly over [0, 1] across the samples; the other tasks draw them at random.
    """
    from megatron.core.datasets.indexed_dataset import DType

    from megatron_ext.data.indexed import AtomicDatasetWriter

    rng = random.Random(seed)
    pieces = _Pieces(tokenizer, seed)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    answers_tmp = output_prefix + ".answers.jsonl.tmp"
    try:
        with AtomicDatasetWriter(output_prefix, DType.optimal_dtype(tokenizer.vocab_size)) as writer, \
                open(answers_tmp, "w") as answers:
            for i in range(num_samples):
                depth = i / max(1, num_samples - 1) if task == "passkey" else None
                sample = make_sample(task, tokenizer, length, rng, pieces, num_needles, hops, depth, append_eod)
                writer.builder.add_document(np.asarray(sample.tokens), [len(sample.tokens)])
                answers.write(json.dumps({"index": i, "task": task, "length": length, "answer": sample.answer,
                                          "answer_start": sample.answer_start, "depths": sample.depths,
                                          "eod": append_eod}) + "\n")
    except BaseException:
        if os.path.exists(answers_tmp):
            os.remove(answers_tmp)
        raise
    os.replace(answers_tmp, output_prefix + ".answers.jsonl")
    return output_prefix


def iter_task_samples(prefix: str) -> Iterator[Tuple[np.ndarray, np.ndarray, Dict]]:
    """(prompt tokens, answer tokens without EOD, record) for each sample of a written task dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    with open(prefix + ".answers.jsonl") as f:
        for i, line in enumerate(f):
            record = json.loads(line)
            tokens = np.asarray(dataset[i], dtype=np.int64)
            end = len(tokens) - 1 if record.get("eod", True) else len(tokens)
            yield tokens[: record["answer_start"]], tokens[record["answer_start"]: end], record


def parse_variable_chains(text: str) -> Dict[str, str]:
    """Resolve ``VAR X = 123.`` / ``VAR Y = VAR X.`` statements in a text to each variable's value."""
    import re

    direct = dict(re.findall(r"VAR ([A-Z]+) = (\d+)\.", text))
    refs = dict(re.findall(r"VAR ([A-Z]+) = VAR ([A-Z]+)\.", text))
    values = dict(direct)
    for _ in range(len(refs) + 1):
        for dst, src in refs.items():
            if src in values:
                values[dst] = values[src]
    return values
