"""The Hugging Face model of megatron_ext.hf against the megatron model it is converted from: same logits (CPU,
fp32) for every convertible family and option, and a clear refusal of what it does not implement."""

import pytest
import torch

pytest.importorskip("transformers")

from megatron_ext.hf import HSAGPTConfig, HSAGPTForCausalLM  # noqa: E402
from megatron_ext.hf.convert import hf_config_fields, hf_state_dict  # noqa: E402
from megatron_ext.models import build_model  # noqa: E402
from tests.models.tiny import CHUNK, FAMILIES, SEQ, VOCAB, tiny_config  # noqa: E402

CASES = {
    "gpt_full": dict(FAMILIES["gpt_full"]),
    "gpt_swa": dict(FAMILIES["gpt_swa"]),
    "swa_hsa": dict(FAMILIES["swa_hsa"]),
    "swa_hsa_options": dict(FAMILIES["swa_hsa_options"]),
    # Megatron-LM's defaults where the families set others: LayerNorm, untied output layer, biases, SiLU gate,
    # partial RoPE; an encoder with its own query groups and FFN, two KV heads with their own retrieval heads
    "swa_hsa_layernorm_untied": dict(pattern="swa [hsa swa]*2", normalization="LayerNorm",
                                     untie_embeddings_and_output_weights=True, add_bias_linear=True,
                                     activation_func=torch.nn.functional.silu, rotary_percent=0.5,
                                     hsa_inner_swa=True, hsa_inner_window_size=10, hsa_num_kv_heads=2,
                                     hsa_encoder_num_query_groups=4, hsa_encoder_ffn_hidden_size=64,
                                     hsa_encoder_layers=2, hsa_rank_decay=True),
    # megatron's softmax_scale replaces 1/sqrt(kv_channels) in the decoder's and the chunk encoder's attention
    # Megatron-LM's GPT default (GeLU MLP with biases, --bias-gelu-fusion): the fused bias-GeLU is the tanh
    # approximation; so is the fused GeGLU
    "gpt_gelu_bias_fusion": dict(pattern="full swa", activation_func=torch.nn.functional.gelu,
                                 gated_linear_unit=False, add_bias_linear=True, bias_activation_fusion=True),
    "swa_hsa_geglu_fusion": dict(pattern="swa [hsa swa]", activation_func=torch.nn.functional.gelu,
                                 bias_activation_fusion=True),
    "swa_hsa_softmax_scale": dict(pattern="full [hsa swa]*2", softmax_scale=0.5, hsa_inner_swa=True),
    # MoE (the converter's one-rank model has megatron_ext's grouped-GEMM experts): softmax over the top-k logits
    # with a shared expert and a dense first layer; softmax before the top-k, scaled, on alternate layers; sigmoid
    # scores chosen with an expert bias, an fp32 router
    "swa_hsa_moe": dict(FAMILIES["swa_hsa_moe"], moe_experts_impl="grouped_gemm"),
    "swa_moe_pre_softmax": dict(pattern="swa*4", num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                                moe_layer_freq=[0, 1, 0, 1], moe_router_pre_softmax=True,
                                moe_router_topk_scaling_factor=2.5, moe_experts_impl="grouped_gemm"),
    "swa_hsa_moe_sigmoid": dict(pattern="swa [hsa swa]", num_moe_experts=6, moe_router_topk=3,
                                moe_ffn_hidden_size=24, moe_router_score_function="sigmoid",
                                moe_router_enable_expert_bias=True, moe_router_dtype="fp32",
                                moe_experts_impl="grouped_gemm"),
    # ALiBi in every causal attention (the HSA layers' inner SWA too), no RoPE in the decoder
    "swa_hsa_alibi": dict(pattern="full [hsa swa]", swa_alibi=True, position_embedding_type="none",
                          hsa_inner_swa=True, num_attention_heads=8),
    # DRT (its data without landmark tokens: the ids go in as they are; with landmarks see the GCA tests below):
    # ALiBi, two encoder layers, one group of two GCA layers; then two groups, RoPE, off-by-one softmax without
    # the landmark null slot, plain residual, KV heads of their own
    "drt_gca": dict(FAMILIES["drt_gca"]),
    "drt_gca_options": dict(pattern="swa [gca] swa [gca swa]", gca_softmax_off_by_one=True,
                            gca_landmark_null_slot=False, hsa_bypass_residual=False, gca_num_kv_heads=2),
    # GCA layers with MoE MLPs (a dense first layer)
    "drt_gca_moe": dict(pattern="swa:dense [gca*2]", num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                        swa_alibi=True, position_embedding_type="none", moe_experts_impl="grouped_gemm"),
}
LANDMARK = VOCAB - 1  # the GCA tests' landmark token; their text ids lie below it


def _megatron_and_hf(case, landmark_token_id=None):
    spec = dict(CASES[case])
    pattern = spec.pop("pattern")
    config = tiny_config(pattern, **spec)
    model = build_model(config).eval()
    with torch.no_grad():
        # non-default values in every parameter, so that a wrongly mapped one shows, and matrices 5x megatron's
        # init so that every path (HSA's output through the bypass MLP too) moves the logits well above tolerance
        for name, p in model.named_parameters():
            if "rank_decay" in name:
                p.fill_(0.3)
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(5.0)
        for name, buffer in model.named_buffers():
            if name.endswith("router.expert_bias"):  # learned during training; zero at init
                buffer.copy_(0.5 * torch.randn_like(buffer))
    fields = hf_config_fields(config, VOCAB, landmark_token_id=landmark_token_id)
    hf = HSAGPTForCausalLM(HSAGPTConfig(**fields, hsa_kernel_backend="reference")).eval()
    state = hf_state_dict(model.state_dict(), tied=fields["tie_word_embeddings"])
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not missing, missing
    return model, hf


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_logits_equal_megatron_logits(megatron_world, case):
    model, hf = _megatron_and_hf(case)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens, torch.arange(SEQ).expand(2, SEQ), None)
        got = hf(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if "hsa" in case or "gca" in case:  # the comparison covers the HSA/GCA path: without it the logits move far
        _assert_retrieval_output_moves_logits(hf, tokens, got)
    if "moe" in case:  # and the routed experts
        with torch.no_grad():
            for module in hf.modules():
                if type(module).__name__ == "Experts":
                    module.weight2.zero_()
            assert (hf(tokens).logits - got).abs().max() > 0.05


def _assert_retrieval_output_moves_logits(hf, tokens, logits):
    with torch.no_grad():
        for layer in hf.decoder.layers:
            if hasattr(layer, "cross_attention"):
                layer.cross_attention.output_proj.weight.zero_()
        assert (hf(tokens).logits - logits).nan_to_num().abs().max() > 0.05  # (a landmark column: -inf - -inf)


def _text_and_model_ids(batch, chunks, seed):
    """Text ids below the landmark, and the megatron model's input: the training data's landmark insertion."""
    from megatron_ext.data.landmarks import insert_landmarks

    text = torch.randint(0, LANDMARK, (batch, chunks * (CHUNK - 1)), generator=torch.Generator().manual_seed(seed))
    model_ids = torch.stack([
        insert_landmarks({"tokens": t, "labels": t, "loss_mask": torch.ones(len(t))}, CHUNK, LANDMARK, eod=0)["tokens"]
        for t in text])
    return text, model_ids


@pytest.mark.parametrize("case", ["drt_gca", "drt_gca_options"])
def test_gca_model_takes_text_and_inserts_the_landmarks_itself(megatron_world, case):
    # megatron's model reads the training data's layout (a landmark closing every chunk); the Hugging Face model
    # takes text only: its logits are megatron's at the text positions, the landmark's column -inf
    model, hf = _megatron_and_hf(case, landmark_token_id=LANDMARK)
    text, model_ids = _text_and_model_ids(2, SEQ // CHUNK, seed=3)
    with torch.no_grad():
        expected = model(model_ids, torch.arange(SEQ).expand(2, SEQ), None)
        got = hf(text).logits
    is_text = model_ids[0] != LANDMARK
    assert int(is_text.sum()) == text.shape[1]
    torch.testing.assert_close(got[..., :LANDMARK], expected[:, is_text, :LANDMARK], rtol=1e-4, atol=1e-4)
    assert torch.isneginf(got[..., LANDMARK]).all()
    _assert_retrieval_output_moves_logits(hf, text, got)
    with pytest.raises(ValueError, match="landmark token"):
        hf(model_ids)


@pytest.mark.parametrize("prompt", [1, CHUNK - 1, 2 * (CHUNK - 1) + 3])
def test_gca_cached_steps_give_the_logits_of_the_whole_text(megatron_world, prompt):
    # the oracle is the model on the whole text (itself equal to megatron's, above); the steps cross 3 chunks,
    # each completed by the landmark the cache inserts
    _, hf = _megatron_and_hf("drt_gca", landmark_token_id=LANDMARK)
    text, _ = _text_and_model_ids(2, 5, seed=8)
    with torch.no_grad():
        full = hf(text).logits
        out = hf(text[:, :prompt], use_cache=True)
        got, cache = [out.logits], out.past_key_values
        for t in range(prompt, text.shape[1]):
            out = hf(text[:, t:t + 1], past_key_values=cache)
            assert cache.get_seq_length() == t + 1 and cache.length == t + 1 + (t + 1) // (CHUNK - 1)
            got.append(out.logits)
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-4, atol=1e-4)
    generated = hf.generate(text[:, :prompt], max_new_tokens=10, do_sample=False)
    assert not (generated == LANDMARK).any()


def test_hf_loss_is_the_shifted_cross_entropy(megatron_world):
    model, hf = _megatron_and_hf("swa_hsa")
    tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        # megatron's labels are the next tokens; Hugging Face's are the inputs, shifted inside
        per_token = model(tokens[:, :-1], torch.arange(SEQ)[None], None, labels=tokens[:, 1:])
        got = hf(tokens, labels=tokens).loss
    torch.testing.assert_close(got, per_token.mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [1, 7, 9, SEQ - 3])
def test_lengths_that_are_not_whole_chunks(megatron_world, length):
    # megatron's model takes whole chunks only; the causal model's first `length` outputs are those of any longer
    # input with the same prefix, which the HF model must give for the prefix alone (generation grows one by one)
    model, hf = _megatron_and_hf("swa_hsa")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(tokens, torch.arange(SEQ).expand(2, SEQ), None)[:, :length]
        got = hf(tokens[:, :length]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_greedy_generation_extends_with_the_argmax_of_each_step(megatron_world):
    _, hf = _megatron_and_hf("swa_hsa")
    prompt = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(6))
    out = hf.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert out.shape == (1, 18) and torch.equal(out[:, :13], prompt)
    with torch.no_grad():
        for t in range(13, 18):
            assert out[0, t] == hf(out[:, :t]).logits[0, -1].argmax()


def test_generation_with_the_default_use_cache(megatron_world):
    # generate() uses the model's cache unless told otherwise: the same tokens as recomputing everything, batch 2,
    # across chunk boundaries (the chunk filled during generation joins the memory)
    _, hf = _megatron_and_hf("swa_hsa")
    prompt = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))
    out = hf.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 26)
    assert torch.equal(out, hf.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0, use_cache=False))


# Every HSA option path, inner SWA windows, RoPE (partial too), 1 and 2 KV heads with shared or own retrieval heads
# prompts of 1 token (no chunk yet), a whole chunk (nothing pending) and a chunk and a part
@pytest.mark.parametrize("case, prompt", [("swa_hsa", 1), ("swa_hsa", 8), ("swa_hsa", 13), ("gpt_full", 13),
                                          ("gpt_swa", 13), ("swa_hsa_options", 13), ("swa_hsa_layernorm_untied", 13),
                                          ("swa_hsa_softmax_scale", 1), ("swa_hsa_moe", 13),
                                          ("swa_hsa_alibi", 13), ("drt_gca", 1), ("drt_gca", 8),
                                          ("drt_gca_options", 13), ("drt_gca_moe", 13)])
def test_cached_steps_give_the_logits_of_the_whole_sequence(megatron_world, case, prompt):
    # The oracle is the model on the whole sequence (itself equal to megatron's, above): a prompt, then one token
    # per call with the cache, through 3 chunk boundaries and past every window
    _, hf = _megatron_and_hf(case)
    tokens = torch.randint(0, VOCAB, (2, prompt + 27), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = hf(tokens).logits
        out = hf(tokens[:, :prompt], use_cache=True)
        got = [out.logits]
        cache = out.past_key_values
        for t in range(prompt, tokens.shape[1]):
            out = hf(tokens[:, t:t + 1], past_key_values=cache)
            assert out.past_key_values is cache and cache.length == cache.get_seq_length() == t + 1
            got.append(out.logits)
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-4, atol=1e-4)
    # several new tokens in one call run one by one
    with torch.no_grad():
        cache = hf(tokens[:, :prompt], use_cache=True).past_key_values
        rest = hf(tokens[:, prompt:], past_key_values=cache).logits
    torch.testing.assert_close(rest, full[:, prompt:], rtol=1e-4, atol=1e-4)


def test_the_cache_keeps_windows_and_whole_chunks_only(megatron_world):
    _, hf = _megatron_and_hf("swa_hsa")
    tokens = torch.randint(0, VOCAB, (1, 37), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cache = hf(tokens, use_cache=True).past_key_values
    memory = next(state for state in cache.layers.values() if "landmarks" in state)
    assert memory["landmarks"].shape[1] == 4 and memory["keys"].shape[1] == 32 and memory["pending"].shape[1] == 5
    windows = {state["k"].shape[1] for i, state in cache.layers.items()}
    assert windows == {hf.config.swa_window_size}  # every attention of this model is a window


def test_landmarks_at_other_intervals_than_the_chunks_are_refused(megatron_world):
    # the Hugging Face model inserts a landmark at the end of each of its chunks, as GCA's data has them
    spec = dict(CASES["drt_gca"])
    config = tiny_config(spec.pop("pattern"), **spec)
    assert hf_config_fields(config, VOCAB, landmark_token_id=LANDMARK, landmark_chunk_size=CHUNK)["landmark_token_id"]
    for pattern, chunk in (("swa [gca swa]", 2 * CHUNK), ("swa*2", CHUNK)):
        config = tiny_config(pattern, swa_alibi=True, position_embedding_type="none")
        with pytest.raises(ValueError, match="cannot be converted .*landmark tokens every"):
            hf_config_fields(config, VOCAB, landmark_token_id=LANDMARK, landmark_chunk_size=chunk)


def test_layer_kinds_without_a_hf_implementation_are_refused_by_name(megatron_world, monkeypatch):
    from megatron_ext.models import registry

    monkeypatch.setitem(registry.ATTENTION_KINDS, "local", registry.ATTENTION_KINDS["swa"])  # a user's own kind
    config = tiny_config("swa local")
    with pytest.raises(ValueError, match=r"cannot be converted .*layer kinds \['local'\]"):
        hf_config_fields(config, VOCAB)


@pytest.mark.parametrize("option, what", [
    (dict(use_mup=True), "muP"),
    (dict(no_rope_freq=3), "no_rope_freq"),
    (dict(attention_output_gate=True), "attention_output_gate"),
    (dict(glu_linear_offset=1.0), "glu_linear_offset"),
    (dict(activation_func_clamp_value=0.5), "activation_func_clamp_value"),
    (dict(softmax_type="off-by-one"), "softmax_type 'off-by-one'"),
])
def test_megatron_options_the_hf_model_lacks_are_refused(megatron_world, option, what):
    # megatron computes these differently from the HF model (other scales, RoPE, gates, activations, softmax):
    # converting them would give a model with other logits
    config = tiny_config("swa [hsa swa]", **option)
    with pytest.raises(ValueError, match=r"cannot be converted .*" + what):
        hf_config_fields(config, VOCAB)


@pytest.mark.parametrize("option, what", [
    (dict(moe_expert_capacity_factor=1.0), "token dropping"),
    (dict(moe_shared_expert_gate=True), "a gated shared expert"),
    (dict(moe_router_num_groups=2, moe_router_group_topk=1), "group-limited routing"),
    (dict(moe_router_score_function="sqrtsoftplus"), "sqrtsoftplus"),
])
def test_moe_options_the_hf_model_lacks_are_refused(megatron_world, option, what):
    spec = dict(FAMILIES["swa_hsa_moe"], **option)
    config = tiny_config(spec.pop("pattern"), **spec)
    with pytest.raises(ValueError, match=r"cannot be converted .*" + what):
        hf_config_fields(config, VOCAB)


def test_logits_to_keep_gives_the_last_positions_and_generate_uses_it(megatron_world, monkeypatch):
    _, hf = _megatron_and_hf("swa_hsa")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = hf(tokens).logits
        last = hf(tokens, logits_to_keep=5).logits
    assert last.shape == (2, 5, VOCAB)
    torch.testing.assert_close(last, full[:, -5:], rtol=1e-5, atol=1e-5)  # a smaller GEMM: rounding only
    with pytest.raises(ValueError, match="logits_to_keep and labels"):
        hf(tokens, labels=tokens, logits_to_keep=1)
    # generate() asks for one position: the prompt's [L, vocab] logits are never made
    shapes = []
    hf.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.logits.shape)))
    hf.generate(tokens[:, :20], max_new_tokens=3, do_sample=False)
    assert shapes[0] == (2, 1, VOCAB)


@pytest.mark.parametrize("window, block", [(6, 8), (6, 16), (15, 4), (40, 16)])
def test_banded_attention_equals_the_masked_whole_sequence(window, block):
    # the sliding-window prefill by query blocks (memory s * (block + window)) against one [s, s] band mask
    from megatron_ext.hf.modeling_hsa_gpt import banded_attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 50, 8, generator=g) for _ in range(3))
    i, j = torch.arange(50)[:, None], torch.arange(50)[None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j <= window),
                                                                scale=0.3)
    torch.testing.assert_close(banded_attention(q, k, v, window, 0.3, block=block), expected, rtol=1e-5, atol=1e-6)


def test_long_prompts_take_the_banded_path(megatron_world, monkeypatch):
    # blocks smaller than the test sequence: the model's logits are still the megatron model's
    from megatron_ext.hf import modeling_hsa_gpt

    monkeypatch.setattr(modeling_hsa_gpt, "BAND_BLOCK", 8)
    model, hf = _megatron_and_hf("swa_hsa")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens, torch.arange(SEQ).expand(2, SEQ), None)
        got = hf(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case, change", [
    ("swa_moe_pre_softmax", dict(moe_router_pre_softmax=False)),
    ("swa_moe_pre_softmax", dict(moe_router_topk_scaling_factor=None)),
    ("swa_hsa_moe_sigmoid", dict(moe_router_score_function="softmax")),
    ("swa_hsa_moe_sigmoid", "expert_bias"),
    ("swa_hsa_moe", "shared_experts"),
])
def test_each_moe_option_reaches_the_logits(megatron_world, case, change):
    # the MoE comparisons above cover each router option and the shared expert: without it the logits move
    model, hf = _megatron_and_hf(case)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens, torch.arange(SEQ).expand(2, SEQ), None)
        if isinstance(change, dict):
            for name, value in change.items():
                setattr(hf.config, name, value)
        else:
            for name, tensor in [*hf.named_buffers(), *hf.named_parameters()]:
                if name.endswith("router.expert_bias") or (change in name and "linear_fc2" in name):
                    tensor.zero_()
        got = hf(tokens).logits
    assert (got - expected).abs().max() > 1e-3


def test_expert_bias_stays_fp32_when_the_model_is_cast_to_bf16():
    # megatron keeps the learned expert bias in fp32 in bf16 training; rounded to bf16 (ulp 2^-7 near 1) these
    # biases would all be 1.0 and the router would pick another expert
    from megatron_ext.hf.modeling_hsa_gpt import Router

    config = HSAGPTConfig(hidden_size=8, num_moe_experts=4, moe_router_topk=1, moe_router_score_function="sigmoid",
                          moe_router_expert_bias=True, moe_router_dtype="fp32")
    router = Router(config)
    with torch.no_grad():
        router.weight.zero_()  # equal scores: the bias alone chooses
        router.expert_bias.copy_(torch.tensor([1.0, 1.001, 1.003, 1.002]))
    bias = router.expert_bias.clone()
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, bias)
    _, experts = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert experts.flatten().tolist() == [2] * 5


@pytest.mark.parametrize("case, landmark", [("swa_hsa", None), ("drt_gca", LANDMARK)])
def test_right_padded_batches_give_each_sequences_own_logits(megatron_world, case, landmark):
    # scoring batches of unequal lengths: right padding leaves every real position's logits those of the sequence
    # alone; left padding and padded generation are refused
    _, hf = _megatron_and_hf(case, landmark_token_id=landmark)
    tokens = torch.randint(0, VOCAB - 1, (2, 40), generator=torch.Generator().manual_seed(11))
    lengths = [40, 27]
    mask = (torch.arange(40)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        batch = hf(tokens.masked_fill(mask == 0, 0), attention_mask=mask).logits
        for row, n in enumerate(lengths):
            alone = hf(tokens[row:row + 1, :n]).logits[0]
            torch.testing.assert_close(batch[row, :n], alone, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="only right padding"):
            hf(tokens, attention_mask=mask.flip(1))
        with pytest.raises(ValueError, match="only right padding"):
            hf(tokens, attention_mask=mask, use_cache=True)
