"""Procedural generator of the bundled tiny corpus (all text written by this project; license-clean).

The corpus is small English-like prose with some long-range structure, so that a tiny model has something to
learn and to remember: short stories in which an object is hidden early and found late, arithmetic facts,
lists, letters and dialogues. Deterministic for a seed.

Regenerate the committed files (corpus, then the SentencePiece tokenizer trained on it) with:

    python -m megatron_ext.data.corpus.generate
"""

from __future__ import annotations

import io
import json
import os
import random
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS_FILE = os.path.join(HERE, "tiny_corpus.jsonl")
TOKENIZER_PREFIX = os.path.join(HERE, "tiny_sp")

NAMES = ["Mira", "Tomas", "Ada", "Kenji", "Lena", "Omar", "Priya", "Jonah", "Sofia", "Bram", "Ines", "Felix",
         "Nadia", "Theo", "Yara", "Luca", "Hana", "Emil", "Rosa", "Ivo"]
PLACES = ["the harbour", "the old mill", "the library", "the orchard", "the market", "the lighthouse",
          "the station", "the garden", "the bakery", "the workshop", "the school", "the bridge"]
OBJECTS = ["a brass key", "a green notebook", "a silver coin", "a folded map", "a wooden whistle", "a glass marble",
           "a red ribbon", "a small compass", "a paper crane", "a copper bell", "an old photograph", "a blue pencil"]
CONTAINERS = ["the blue box", "the top drawer", "the clay jar", "the tin chest", "the coat pocket",
              "the basket by the door", "the hollow tree", "the shelf above the stove"]
ADJECTIVES = ["quiet", "bright", "windy", "cold", "warm", "grey", "busy", "calm", "long", "strange", "dark", "sunny"]
TIMES = ["In the morning", "At noon", "In the evening", "Before dawn", "After lunch", "On Sunday", "That winter",
         "Later that week", "The next day", "At midnight"]
ACTIONS = ["walked to", "ran to", "looked around", "waited at", "cleaned", "painted a sign for", "counted the boats at",
           "read a book at", "sang a song at", "fixed a chair at", "swept the floor of", "drew a picture of"]
FEELINGS = ["happy", "tired", "curious", "worried", "proud", "surprised", "calm", "hungry", "sleepy", "glad"]
FOODS = ["bread", "soup", "apples", "rice", "cheese", "plums", "beans", "honey cake", "tea", "noodles"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def _sentence_filler(rng: random.Random, who: str) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"{rng.choice(TIMES)}, {who} {rng.choice(ACTIONS)} {rng.choice(PLACES)}."
    if kind == 1:
        return f"The day was {rng.choice(ADJECTIVES)} and {who} felt {rng.choice(FEELINGS)}."
    if kind == 2:
        return f"{who} ate {rng.choice(FOODS)} with {rng.choice(NAMES)} at {rng.choice(PLACES)}."
    if kind == 3:
        return f"{rng.choice(NAMES)} told {who} a {rng.choice(ADJECTIVES)} story about {rng.choice(PLACES)}."
    return f"{who} saw {rng.choice(OBJECTS)} near {rng.choice(PLACES)}, but it was not the one."


def story(rng: random.Random) -> str:
    """An object is hidden in a container early and looked for at the end: a long-range dependency."""
    who, obj, box = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CONTAINERS)
    lines = [f"{who} put {obj} in {box} and closed it."]
    lines += [_sentence_filler(rng, who) for _ in range(rng.randint(6, 40))]
    lines.append(f"At last {who} wanted {obj} again. {who} remembered and opened {box}. "
                 f"There it was: {obj}.")
    return " ".join(lines)


def arithmetic(rng: random.Random) -> str:
    facts = []
    for _ in range(rng.randint(4, 12)):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        if rng.random() < 0.5:
            facts.append(f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")
        else:
            hi, lo = max(a, b), min(a, b)
            facts.append(f"{NUMBER_WORDS[hi].capitalize()} minus {NUMBER_WORDS[lo]} is {NUMBER_WORDS[hi - lo]}.")
    return " ".join(facts)


def shopping_list(rng: random.Random) -> str:
    who = rng.choice(NAMES)
    items = rng.sample(FOODS, rng.randint(3, 7))
    lines = [f"{who} wrote a list for the market:"]
    lines += [f"- {rng.randint(1, 9)} portions of {item}" for item in items]
    lines.append(f"Then {who} went to the market and bought everything except the {rng.choice(items)}.")
    return "\n".join(lines)


def letter(rng: random.Random) -> str:
    sender, receiver = rng.sample(NAMES, 2)
    body = [_sentence_filler(rng, sender) for _ in range(rng.randint(3, 10))]
    return f"Dear {receiver},\n\n" + " ".join(body) + f"\n\nWith love,\n{sender}"


def dialogue(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    place = rng.choice(PLACES)
    turns = [f'"Where were you?" asked {a}.', f'"I was at {place}," said {b}.']
    for _ in range(rng.randint(2, 8)):
        food = rng.choice(FOODS)
        turns.append(f'"Did you bring {food}?" asked {a}.')
        turns.append(rng.choice([f'"Yes, I brought {food}," said {b}.', f'"No, only {rng.choice(FOODS)}," said {b}.']))
    turns.append(f'"Then let us go back to {place} together," said {a}.')
    return "\n".join(turns)


GENRES = [story, story, story, arithmetic, shopping_list, letter, dialogue]


def generate_documents(num_documents: int = 700, seed: int = 1234) -> List[str]:
    rng = random.Random(seed)
    return [rng.choice(GENRES)(rng) for _ in range(num_documents)]


def write_corpus(path: str = CORPUS_FILE, num_documents: int = 700, seed: int = 1234) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(generate_documents(num_documents, seed)):
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")


def train_tokenizer(corpus: str = CORPUS_FILE, prefix: str = TOKENIZER_PREFIX, vocab_size: int = 512) -> None:
    """A small BPE SentencePiece model with byte fallback (so any text encodes losslessly)."""
    import sentencepiece

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    model = io.BytesIO()  # written through a buffer so that no local path is recorded in the model's trainer spec
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, character_coverage=1.0,
        num_threads=1, minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True,
    )
    with open(prefix + ".model", "wb") as f:
        f.write(model.getvalue())


if __name__ == "__main__":
    write_corpus()
    train_tokenizer()
    print(f"wrote {CORPUS_FILE} ({os.path.getsize(CORPUS_FILE):,} bytes) and {TOKENIZER_PREFIX}.model "
          f"({os.path.getsize(TOKENIZER_PREFIX + '.model'):,} bytes)")
