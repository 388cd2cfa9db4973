"""Score a causal language model on the synthetic long-context tasks of ``megatron_ext.data.synthetic``.

Each sample is one document: prompt (haystack with needles, then the question) and answer. One forward pass over
prompt + answer scores it: the answer's tokens are compared with the argmax of the logits before each of them
(teacher forcing). All of them right is exactly what greedy decoding of the answer after the prompt produces, so
``exact`` is the greedy exact-match accuracy without generating; ``token_accuracy`` and ``answer_nll`` (mean
negative log-likelihood of the answer tokens, nats) grade the misses. Only the answer's logits are computed
(``logits_to_keep``), so the prompt can be as long as the model can read.

The model is anything called as a Hugging Face causal LM: ``model(input_ids=[1, T], logits_to_keep=N).logits``.
``tools/evaluate_synthetic.py`` is the command line.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["score_sample", "score_task_dataset", "summarize", "DEPTH_BINS"]

DEPTH_BINS = 5  # the summary's needle-depth buckets (0-20%, ..., 80-100% of the prompt)


@torch.no_grad()
def score_sample(model, prompt: np.ndarray, answer: np.ndarray, device) -> dict:
    """exact (greedy decoding would give the whole answer), token_accuracy and answer_nll of one sample."""
    if len(prompt) == 0 or len(answer) == 0:
        raise ValueError("a sample needs a prompt and an answer of at least one token each")
    tokens = torch.as_tensor(np.concatenate([prompt, answer]), dtype=torch.long, device=device)[None]
    n = len(answer)
    # the logits at positions len(prompt)-1 ... T-2 predict the answer's tokens
    logits = model(input_ids=tokens, logits_to_keep=n + 1).logits[0, :n].float()
    target = tokens[0, len(prompt):]
    correct = logits.argmax(-1) == target
    return {"exact": bool(correct.all()), "token_accuracy": correct.float().mean().item(),
            "answer_nll": F.cross_entropy(logits, target).item()}


def score_task_dataset(model, prefix: str, device, *, vocab_size: Optional[int] = None,
                       max_samples: Optional[int] = None, log: Callable[[str], None] = print) -> list[dict]:
    """One record per sample of the task dataset at ``prefix`` (``tools/make_synthetic_data.py``'s output): the
    dataset's own record (index, task, length, answer, needle depths) plus the scores of :func:`score_sample`."""
    from megatron_ext.data.synthetic import iter_task_samples

    for suffix in (".bin", ".idx", ".answers.jsonl"):
        if not os.path.isfile(prefix + suffix):
            raise FileNotFoundError(f"{prefix}{suffix} does not exist: give the --output-prefix of "
                                    f"tools/make_synthetic_data.py")
    records = []
    for i, (prompt, answer, record) in enumerate(iter_task_samples(prefix)):
        if max_samples is not None and i >= max_samples:
            break
        top = int(max(prompt.max(), answer.max()))
        if vocab_size is not None and top >= vocab_size:
            raise ValueError(f"{prefix}: sample {i} holds token id {top}, past the model's vocabulary of "
                             f"{vocab_size}: the data was written with another tokenizer than the model's")
        scores = score_sample(model, prompt, answer, device)
        length = len(prompt) + len(answer) + (1 if record.get("eod", True) else 0)  # the document, EOD included
        records.append({"length": length, **record, "prefix": prefix, **scores})
        log(f"{os.path.basename(prefix)} sample {i}: length {records[-1]['length']}, exact {int(scores['exact'])}, "
            f"token accuracy {scores['token_accuracy']:.3f}, answer NLL {scores['answer_nll']:.3f}")
    return records


def _depth_bin(record: dict) -> Optional[int]:
    depths = record.get("depths") or []
    if len(depths) != 1:
        return None  # several needles: no one depth
    return min(int(depths[0] * DEPTH_BINS), DEPTH_BINS - 1)


def summarize(records: Iterable[dict]) -> list[dict]:
    """Mean scores per (task, length), and per needle-depth bucket for one-needle tasks (depth_bin None: all)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["task"], r["length"], None)].append(r)
        depth = _depth_bin(r)
        if depth is not None:
            groups[(r["task"], r["length"], depth)].append(r)
    rows = []
    for (task, length, depth), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] is not None,
                                                                           kv[0][2] or 0)):
        rows.append({"task": task, "length": length, "depth_bin": depth, "samples": len(rs),
                     "exact": sum(r["exact"] for r in rs) / len(rs),
                     "token_accuracy": sum(r["token_accuracy"] for r in rs) / len(rs),
                     "answer_nll": sum(r["answer_nll"] for r in rs) / len(rs)})
    return rows
