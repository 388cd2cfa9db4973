"""Every model family builds through megatron-core's GPTModel, trains, and is causal across chunk boundaries."""

import pytest
import torch

from megatron_ext.layers.chunk_memory import ChunkMemory
from megatron_ext.models import build_model
from tests.models.tiny import CHUNK, FAMILIES, SEQ, VOCAB, WINDOW, tiny_config


def _model(family: str, **overrides):
    spec = dict(FAMILIES[family])
    pattern = spec.pop("pattern")
    spec.update(overrides)
    return build_model(tiny_config(pattern, **spec))


def _batch(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(batch, SEQ)
    return tokens, labels, positions


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_backward_and_a_few_steps_reduce_the_loss(megatron_world, family):
    model = _model(family)
    tokens, labels, positions = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(4):
        opt.zero_grad()
        loss = model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not missing, f"parameters without a finite gradient: {missing}"
            zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
            # Only the MoE experts that no token was routed to may have an all-zero gradient.
            assert all(".experts." in n for n in zero), f"parameters with zero gradient: {zero}"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("family", ["gpt_swa", "swa_hsa", "swa_hsa_moe", "swa_hsa_options", "drt_gca"])
def test_future_tokens_never_change_the_past(megatron_world, family):
    # Retrieval on, Gumbel noise off (eval mode); MoE with dropless routing is per-token too.
    model = _model(family, hsa_topk=3)
    model.eval()
    tokens, labels, positions = _batch(batch=1, seed=1)
    with torch.no_grad():
        base_logits = model(tokens, positions, None)
        base_loss = model(tokens, positions, None, labels=labels)
    # Cut points inside a chunk, at chunk starts and at chunk ends, far beyond the window.
    for t in (CHUNK * 2, CHUNK * 3 + 1, CHUNK * 5 - 1, CHUNK * 6, SEQ - 3):
        changed = tokens.clone()
        gen = torch.Generator().manual_seed(t)
        changed[:, t:] = (tokens[:, t:] + torch.randint(1, VOCAB, tokens[:, t:].shape, generator=gen)) % VOCAB
        with torch.no_grad():
            logits = model(changed, positions, None)
            loss = model(changed, positions, None, labels=labels)
        torch.testing.assert_close(logits[:, :t], base_logits[:, :t], rtol=0, atol=1e-6,
                                   msg=f"{family}: logits before t={t} changed")
        torch.testing.assert_close(loss[:, :t], base_loss[:, :t], rtol=0, atol=1e-6)
        assert (logits[:, t] - base_logits[:, t]).abs().max() > 1e-4, "the change at t must be visible at t"


def test_retrieval_layers_see_beyond_the_window(megatron_world):
    """Sanity for the causality test above: HSA outputs do depend on chunks far outside every window."""
    model = _model("swa_hsa", hsa_topk=4)
    model.eval()
    tokens, _, positions = _batch(batch=1, seed=2)
    with torch.no_grad():
        base = model(tokens, positions, None)
        changed = tokens.clone()
        changed[:, :CHUNK] = (changed[:, :CHUNK] + 1) % VOCAB  # only chunk 0
        out = model(changed, positions, None)
    # 2 SWA layers below + an inner window of WINDOW: without retrieval, chunk 0 reaches at most ~3*WINDOW+CHUNK.
    far = 3 * WINDOW + CHUNK + 8
    assert (out[:, far:] - base[:, far:]).abs().amax() > 1e-5


def test_chunk_memory_is_handed_to_every_retrieval_layer(megatron_world):
    model = _model("swa_hsa")
    seen = []
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    tokens, _, positions = _batch(batch=1)
    with torch.no_grad():
        model(tokens, positions, None)
    kinds = [type(layer).__name__ for layer in model.decoder.layers]
    first = kinds.index("RetrievalTransformerLayer")
    assert all(c is None for c in seen[:first])
    memories = seen[first:]
    assert all(isinstance(m, ChunkMemory) for m in memories)
    # One memory (the same K/V tensors) shared above the memory layer; one selection per group.
    assert all(m.keys is memories[0].keys for m in memories)
    assert [m.group for m in memories] == [0, 0, 1, 1]
    assert memories[0].selection is memories[1].selection and memories[2].selection is not memories[0].selection
    assert memories[0].keys.shape == (1, SEQ, 1, 16) and memories[0].landmarks.shape == (1, SEQ // CHUNK, 1, 64)


def test_gumbel_noise_only_in_training(megatron_world):
    model = _model("swa_hsa", hsa_topk=2)
    retrieval = model.decoder.layers[2].retrieval
    x = torch.randn(SEQ, 1, 64, generator=torch.Generator().manual_seed(0))
    memory = model.decoder.layers[2].chunk_memory(x)
    retrieval.eval()
    assert torch.equal(retrieval(x, memory).indices, retrieval(x, memory).indices)
    retrieval.train()
    draws = {tuple(retrieval(x, memory).indices.flatten().tolist()) for _ in range(4)}
    assert len(draws) > 1, "Gumbel noise should change the training-time selection"


def _fused_model_step(device):
    model = _model("swa_hsa", activation_func=torch.nn.functional.silu, bias_activation_fusion=True,
                   bias_dropout_fusion=True).to(device)  # SwiGLU, as the example models
    tokens, labels, positions = (t.to(device) for t in _batch())
    model(tokens, positions, None, labels=labels).sum().backward()
    assert model.decoder.layers[0].mlp.config.bias_activation_fusion  # the decoder's fused path did run


def test_compiled_fusions_see_one_shape_per_model(megatron_world, monkeypatch):
    """megatron's torch.compile'd SwiGLU and bias-dropout-add are shared by all layers. A layer calling them with
    other shapes (the chunk encoder's [S+1, b*C, h]) makes torch.compile recompile them for dynamic shapes, and every
    decoder layer then runs the slower dynamic kernels. Each must see one input shape in a model with an encoder
    (recorded here without compiling: CI needs no C++ compiler)."""
    from megatron.core.fusions import fused_bias_dropout, fused_bias_swiglu

    shapes = {}

    def recording(name, compiled):
        eager = getattr(compiled, "_torchdynamo_orig_callable", compiled)

        def call(*args):
            shapes.setdefault(name, set()).add(tuple(args[0][0].shape if name == "bda" else args[0].shape))
            return eager(*args)

        return call

    monkeypatch.setattr(fused_bias_swiglu, "swiglu", recording("swiglu", fused_bias_swiglu.swiglu))
    monkeypatch.setattr(fused_bias_swiglu, "swiglu_back", recording("swiglu_back", fused_bias_swiglu.swiglu_back))
    monkeypatch.setattr(fused_bias_dropout, "bias_dropout_add_fused_train",
                        recording("bda", fused_bias_dropout.bias_dropout_add_fused_train))
    _fused_model_step("cuda" if torch.cuda.is_available() else "cpu")  # megatron's RoPE follows CUDA if present
    assert set(shapes) == {"swiglu", "swiglu_back", "bda"}
    assert all(len(s) == 1 for s in shapes.values()), shapes


@pytest.mark.gpu
def test_compiled_fusions_compile_once_per_model_gpu(megatron_world):
    """The same through torch.compile itself: no recompilation in a forward + backward."""
    torch._dynamo.reset()  # other tests may have compiled these functions for their shapes
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            _fused_model_step("cuda")
    finally:
        torch._dynamo.reset()
