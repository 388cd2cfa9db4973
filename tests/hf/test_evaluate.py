"""Synthetic-task evaluation (megatron_ext/hf/evaluate.py, tools/evaluate_synthetic.py) against independent
oracles: greedy generation, the cross entropy of the full logits, and models that always or never predict the
next token."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from megatron_ext.data.synthetic import iter_task_samples, write_task_dataset  # noqa: E402
from megatron_ext.data.tokenizers import TokenizerSpec  # noqa: E402
from megatron_ext.hf.evaluate import score_task_dataset, summarize  # noqa: E402
from tests.training import runner  # noqa: E402

TOOL = os.path.join(runner.REPO, "tools", "evaluate_synthetic.py")


@pytest.fixture(scope="module")
def passkey(tmp_path_factory):
    """Passkey samples of 256 tokens with the byte-level tokenizer (ids < 258), depths swept over the prompt."""
    prefix = str(tmp_path_factory.mktemp("data") / "passkey")
    return write_task_dataset(prefix, "passkey", TokenizerSpec("ByteLevelTokenizer").build(), 256, 6, seed=3)


class _Oracle(torch.nn.Module):
    """A 'model' whose logits put the next input token first (shift 1), or always a wrong one (shift 2)."""

    def __init__(self, shift: int, vocab: int = 300):
        super().__init__()
        self.shift, self.vocab = shift, vocab

    def forward(self, input_ids, logits_to_keep=0):
        target = torch.roll(input_ids, -1, dims=1) + (self.shift - 1)
        logits = torch.nn.functional.one_hot(target % self.vocab, self.vocab).float() * 10
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})


def _tiny_hf_model(family: str = "swa_hsa"):
    from megatron_ext.hf import HSAGPTConfig, HSAGPTForCausalLM

    torch.manual_seed(0)
    # DRT: GCA layers, ALiBi, a landmark token (299, above the byte-level ids) that the model inserts itself
    drt = dict(layer_pattern="swa [gca swa]", swa_alibi=True, position_embedding_type="none", landmark_token_id=299)
    fields = dict(vocab_size=300, hidden_size=64, ffn_hidden_size=96, num_layers=3, layer_pattern="swa [hsa swa]",
                  num_attention_heads=4, num_query_groups=2, swa_window_size=16, hsa_chunk_size=8, hsa_topk=2,
                  hsa_kernel_backend="reference")
    config = HSAGPTConfig(**{**fields, **(drt if family == "drt" else {})})
    return HSAGPTForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["swa_hsa", "drt"])
def test_scores_match_greedy_generation_and_the_full_cross_entropy(passkey, family):
    model = _tiny_hf_model(family)
    records = score_task_dataset(model, passkey, "cpu", vocab_size=300, log=lambda msg: None)
    assert len(records) == 6
    for record, (prompt, answer, _) in zip(records, iter_task_samples(passkey)):
        prompt_ids = torch.as_tensor(prompt, dtype=torch.long)[None]
        with torch.no_grad():
            greedy = model.generate(prompt_ids, max_new_tokens=len(answer), do_sample=False, use_cache=False)
            logits = model(torch.as_tensor(np.concatenate([prompt, answer]))[None]).logits[0]
        generated = greedy[0, len(prompt):].numpy()
        assert record["exact"] == bool((generated == answer).all())
        rows = logits[len(prompt) - 1: len(prompt) - 1 + len(answer)]
        expected_nll = torch.nn.functional.cross_entropy(rows, torch.as_tensor(answer)).item()
        assert record["answer_nll"] == pytest.approx(expected_nll, rel=1e-4)
        right = (rows.argmax(-1).numpy() == answer).mean()
        assert record["token_accuracy"] == pytest.approx(right)
        assert record["length"] == 256 and record["task"] == "passkey"


def test_a_model_that_knows_the_next_token_scores_one_and_a_wrong_one_zero(passkey):
    perfect = score_task_dataset(_Oracle(shift=1), passkey, "cpu", log=lambda msg: None)
    wrong = score_task_dataset(_Oracle(shift=2), passkey, "cpu", log=lambda msg: None)
    assert all(r["exact"] and r["token_accuracy"] == 1.0 for r in perfect)
    assert not any(r["exact"] or r["token_accuracy"] for r in wrong)
    rows = summarize(perfect + wrong)
    overall = rows[0]
    assert (overall["depth_bin"], overall["samples"], overall["exact"]) == (None, 12, 0.5)
    assert sum(r["samples"] for r in rows if r["depth_bin"] is not None) == 12  # one depth each


def test_bad_inputs_are_named(passkey, tmp_path):
    with pytest.raises(FileNotFoundError, match="make_synthetic_data.py"):
        score_task_dataset(_Oracle(1), str(tmp_path / "missing"), "cpu")
    with pytest.raises(ValueError, match="another tokenizer than the model's"):
        score_task_dataset(_Oracle(1), passkey, "cpu", vocab_size=100)


def test_command_line_on_a_converted_model_directory(passkey, tmp_path):
    from megatron_ext.hf.convert import save_hf_directory

    model = _tiny_hf_model()
    fields = {k: v for k, v in model.config.to_dict().items() if k in model.config.__init__.__code__.co_varnames}
    save_hf_directory(str(tmp_path / "hf"), fields, {k: v.contiguous() for k, v in model.state_dict().items()})
    out = tmp_path / "scores.jsonl"
    done = subprocess.run([sys.executable, TOOL, "--model", str(tmp_path / "hf"), "--data", passkey,
                           "--max-samples", "3", "--output", str(out), "--quiet"], cwd=runner.REPO,
                          env=runner.env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = score_task_dataset(model, passkey, "cpu", max_samples=3, log=lambda msg: None)
    assert [r["answer_nll"] for r in records] == pytest.approx([r["answer_nll"] for r in expected], rel=1e-4)
    assert "passkey" in done.stdout and "exact" in done.stdout
    bad = subprocess.run([sys.executable, TOOL, "--model", str(tmp_path), "--data", passkey], cwd=runner.REPO,
                         env=runner.env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no config.json there" in bad.stderr
