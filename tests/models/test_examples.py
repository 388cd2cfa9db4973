"""The example model configs: each builds and trains at a tiny size, and the parameter counts hold."""

import glob
import os

import pytest
import torch

from megatron_ext.models import build_model, config_from_yaml, layer_is_moe
from megatron_ext.models.summary import build_meta_model, count_parameters

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "*.yaml")))
TINY = dict(
    hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=16, seq_length=128,
    vocab_size=97, hsa_chunk_size=16, swa_window_size=16, hsa_inner_window_size=16, hsa_retrieval_dim=64,
    hsa_encoder_num_query_groups=2, gca_num_kv_heads=4, hsa_kernel_backend="reference", use_cpu_initialization=True,
)
TINY_MOE = dict(num_experts=4, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32, moe_router_topk=2,
                moe_token_dispatcher_type="allgather")


def test_all_five_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"drt_128m.yaml", "swa_hsa_345m.yaml", "moe_8b_a1b_swa_hsa.yaml", "gpt_345m_full.yaml",
            "gpt_345m_swa.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_trains_at_tiny_size(megatron_world, path):
    full = config_from_yaml(path)
    overrides = dict(TINY, **(TINY_MOE if full.num_moe_experts else {}))
    config = config_from_yaml(path, **overrides)
    assert config.layer_pattern == full.layer_pattern and config.num_layers == full.num_layers
    model = build_model(config)
    tokens = torch.randint(0, 97, (2, 128), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(128).expand(2, 128)
    loss = model(tokens, positions, None, labels=tokens.roll(-1, dims=1)).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_moe_8b_a1b_parameter_counts(megatron_world):
    config = config_from_yaml(os.path.join(os.path.dirname(EXAMPLES[0]), "moe_8b_a1b_swa_hsa.yaml"))
    total, active = count_parameters(build_meta_model(config), config)
    assert 7.5e9 <= total <= 8.5e9, total
    assert 0.9e9 <= active <= 1.5e9, active
    # Independent closed form of the routed-expert parameters (SwiGLU, no bias): fc1 2F x H, fc2 H x F per expert.
    moe_layers = sum(layer_is_moe(config, p) for p in config.layer_plans)
    routed = moe_layers * config.num_moe_experts * 3 * config.hidden_size * config.moe_ffn_hidden_size
    assert active == round(total - routed * (1 - config.moe_router_topk / config.num_moe_experts))


def test_meta_count_equals_a_real_model(megatron_world):
    path = os.path.join(os.path.dirname(EXAMPLES[0]), "moe_8b_a1b_swa_hsa.yaml")
    config = config_from_yaml(path, **TINY, **TINY_MOE)
    real = build_model(config)  # grouped-GEMM experts, real memory
    total, _ = count_parameters(build_meta_model(config), config)
    assert total == sum(p.numel() for p in real.parameters())


def test_model_summary_tool_prints_the_counts(capsys):
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = subprocess.run(
        [sys.executable, os.path.join(root, "tools", "model_summary.py"), "--config",
         os.path.join(root, "examples", "swa_hsa_345m.yaml")],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "layer pattern: swa*8 [hsa swa*4] [hsa swa*4]" in out
    total = int(out.split("total parameters: ")[1].split()[0])
    active = int(out.split("active parameters: ")[1].split()[0])
    # HiLS replica: 8 lower SWA + 2 groups of (HSA + 4 SWA), 18 layers
    assert total == active and round(total / 1e5) == 3898


def test_model_summary_tool_names_a_missing_config_in_one_line(tmp_path):
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    missing = str(tmp_path / "nonexistent.yaml")
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "model_summary.py"), "--config", missing],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"--config {missing}: no such file" in proc.stderr and "Traceback" not in proc.stderr
