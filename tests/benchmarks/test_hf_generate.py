"""benchmarks/hf_generate.py's measurement on a tiny model on the CPU: the cached steps it times are the model's
logits (against the whole-sequence forward it compares them to), and its table has every column."""

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import hf_generate  # noqa: E402
from benchmarks.common import format_table  # noqa: E402
from megatron_ext.hf import HSAGPTConfig, HSAGPTForCausalLM  # noqa: E402
from megatron_ext.hf.convert import hf_config_fields  # noqa: E402
from tests.models.tiny import FAMILIES, VOCAB, tiny_config  # noqa: E402


def test_measure_times_cached_steps_that_give_the_whole_sequence_logits():
    spec = dict(FAMILIES["swa_hsa"])
    config = tiny_config(spec.pop("pattern"), **spec)
    torch.manual_seed(0)
    model = HSAGPTForCausalLM(HSAGPTConfig(**hf_config_fields(config, VOCAB), hsa_kernel_backend="reference")).eval()
    row = hf_generate.measure(model, model, prompt_len=13, new_tokens=6)
    assert row["prompt_len"] == 13 and row["new_tokens"] == 6
    assert row["cached_step_ms"] > 0 and row["uncached_step_ms"] > 0 and row["prefill_ms"] > 0
    # the reference is the model itself here: fp32 both ways, so only summation order separates them
    assert row["uncached_vs_fp32"] == 0.0 and row["cached_vs_fp32"] < 1e-5
    assert row["cache_gib"] > 0
    assert "cached_step_ms" in format_table([row], list(row))
