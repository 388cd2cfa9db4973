"""Megatron-LM's model flags change the model as in Megatron-LM's ``pretrain_gpt.py``, or stop the run with the fix.

Each test parses a Megatron-LM command line (the tiny SWA+HSA model of ``megatron_ext/demo.py``) the way
``pretrain_hsa.py`` does and builds the model through the one model provider.
"""

import sys

import pytest
import torch

from megatron_ext.demo import TINY_SWA_HSA
from megatron_ext.training import arguments

VOCAB = 128
NORM_SLOTS = ("input_layernorm", "pre_cross_attn_layernorm", "pre_mlp_layernorm", "final_layernorm", "q_layernorm",
              "k_layernorm")


def _config(monkeypatch, *extra, normalization=None):
    from megatron.training.arguments import parse_args, validate_args

    from megatron_ext.training.model import transformer_config_from_args

    argv = list(TINY_SWA_HSA)
    at = argv.index("--normalization")
    del argv[at: at + 2]  # no flag: Megatron-LM's default
    if normalization is not None:
        argv += ["--normalization", normalization]
    argv += ["--mock-data", "--vocab-size", str(VOCAB), "--train-iters", "10", *extra]
    monkeypatch.setattr(sys, "argv", ["pretrain_hsa.py", *argv])
    args = parse_args(extra_args_provider=arguments.add_hsa_arguments)
    validate_args(args, arguments.ARGS_DEFAULTS)
    return transformer_config_from_args(args)


def _model(config):
    from megatron_ext.models import build_model

    return build_model(config, vocab_size=VOCAB)


def _norms(model):
    """name -> module of every norm slot of the decoder (transformer layers, QK-norms, final norm)."""
    return {name: m for name, m in model.decoder.named_modules()
            if name.rsplit(".", 1)[-1] in NORM_SLOTS and type(m).__name__ != "IdentityOp"}


@pytest.mark.parametrize("normalization, params", [(None, {"weight", "bias"}), ("LayerNorm", {"weight", "bias"}),
                                                   ("RMSNorm", {"weight"})])
def test_normalization_flag_picks_the_norm(megatron_world, monkeypatch, normalization, params):
    model = _model(_config(monkeypatch, normalization=normalization))
    norms = _norms(model)
    slots = {name.rsplit(".", 1)[-1] for name in norms}
    assert {"input_layernorm", "pre_cross_attn_layernorm", "pre_mlp_layernorm", "final_layernorm",
            "q_layernorm", "k_layernorm"} <= slots
    for name, norm in norms.items():
        assert {n for n, _ in norm.named_parameters()} == params, name


def test_layernorm_is_layer_normalisation_and_trains(megatron_world, monkeypatch):
    model = _model(_config(monkeypatch, normalization="LayerNorm"))
    norm = model.decoder.final_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 2, norm.weight.numel(), dtype=torch.float64)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()
    torch.testing.assert_close(norm(x.float()).double(), expected, rtol=1e-5, atol=1e-5)

    tokens = torch.randint(0, VOCAB, (2, 256))
    positions = torch.arange(256)[None].expand(2, -1)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    assert all(n.bias.grad is not None and n.bias.grad.abs().sum() > 0 for n in _norms(model).values())


def test_rotary_flags_reach_megatrons_rotary_embedding(megatron_world, monkeypatch):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    config = _config(monkeypatch, "--rotary-percent", "0.5", "--use-rope-scaling", "--rope-scaling-factor", "4",
                     "--rotary-seq-len-interpolation-factor", "2")
    rope = _model(config).rotary_pos_emb
    # What Megatron-LM's pretrain_gpt.py builds from these flags.
    expected = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=0.5, rotary_base=config.rotary_base,
                               rope_scaling=True, rope_scaling_factor=4.0, seq_len_interpolation_factor=2,
                               use_cpu_initialization=True)
    assert rope.inv_freq.numel() == config.kv_channels // 4, "half the head dims rotate: d/2 angles / 2"
    torch.testing.assert_close(rope.inv_freq, expected.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(rope(64), expected(64), rtol=0, atol=0)

    plain = _model(_config(monkeypatch)).rotary_pos_emb
    assert plain.inv_freq.numel() == config.kv_channels // 2
    assert not torch.equal(rope(64)[:, :, :, : config.kv_channels // 2 // 2],
                           plain(64)[:, :, :, : config.kv_channels // 2 // 2]), "scaling changes the angles"


def test_fused_rotary_leaves_the_unrotated_dims_alone():
    """The fused rotary (GPU path of the self-attention) honours --rotary-percent as megatron's own rotation."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_ext.kernels.fused import rotary

    x = torch.randn(16, 2, 4, 32)
    freqs = torch.randn(16, 1, 1, 16)  # rotary_percent 0.5
    out = rotary(x, freqs, backend="reference")
    torch.testing.assert_close(out, _apply_rotary_pos_emb_bshd(x, freqs), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[..., 16:], x[..., 16:], rtol=0, atol=0)


def test_window_size_flag_is_refused_with_the_swa_flags(monkeypatch):
    with pytest.raises(ValueError, match=r"window_size.*--window-size.*'swa'.*--swa-window-size"):
        _config(monkeypatch, "--window-size", "32,0")
