"""The converted Hugging Face model on a GPU (run with `make test-gpu`): bf16, the HSA Triton kernels, logits of the
megatron model it came from (FlexAttention windows, fused norms, the same kernels)."""

import pytest
import torch

pytest.importorskip("transformers")

from megatron_ext.hf import HSAGPTConfig, HSAGPTForCausalLM  # noqa: E402
from megatron_ext.hf.convert import hf_config_fields, hf_state_dict  # noqa: E402
from tests.models.test_gpu import SEQ, _gpu_model  # noqa: E402
from tests.models.tiny import VOCAB  # noqa: E402


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["swa_hsa", "gpt_swa", "swa_hsa_moe"])
def test_hf_model_matches_megatron_in_bf16_on_gpu(megatron_world, family):
    torch.manual_seed(0)
    # MoE: the converter's expert layout (grouped GEMM); the router in fp32, so that bf16 rounding of the logits
    # does not decide between near-equal experts
    moe = dict(moe_experts_impl="grouped_gemm", moe_router_dtype="fp32") if "moe" in family else {}
    model = _gpu_model(family, bf16=True, params_dtype=torch.bfloat16, **moe).eval()
    fields = hf_config_fields(model.config, VOCAB)
    hf = HSAGPTForCausalLM(HSAGPTConfig(**fields)).to("cuda", torch.bfloat16).eval()
    hf.load_state_dict(hf_state_dict(model.state_dict(), tied=fields["tie_word_embeddings"]))
    tokens = torch.randint(0, VOCAB, (2, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        expected = model(tokens, torch.arange(SEQ, device="cuda").expand(2, SEQ), None).float()
        got = hf(tokens).logits.float()
    err = (got - expected).norm() / expected.norm()
    assert err < 2e-2, f"relative logits difference {err:.2e}"
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


@pytest.mark.gpu
def test_cached_steps_match_the_whole_sequence_in_bf16_on_gpu(megatron_world):
    # the decode path on the GPU: one-token HSA attention through the Triton kernels, bf16 caches
    torch.manual_seed(0)
    model = _gpu_model("swa_hsa", bf16=True, params_dtype=torch.bfloat16).eval()
    fields = hf_config_fields(model.config, VOCAB)
    hf = HSAGPTForCausalLM(HSAGPTConfig(**fields)).to("cuda", torch.bfloat16).eval()
    hf.load_state_dict(hf_state_dict(model.state_dict(), tied=fields["tie_word_embeddings"]))
    tokens = torch.randint(0, VOCAB, (2, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    prompt = SEQ // 2 + 3
    with torch.no_grad():
        full = hf(tokens).logits.float()
        cache = hf(tokens[:, :prompt], use_cache=True).past_key_values
        got = torch.cat([hf(tokens[:, t:t + 1], past_key_values=cache).logits.float()
                         for t in range(prompt, SEQ)], dim=1)
    expected = full[:, prompt:]
    err = (got - expected).norm() / expected.norm()
    assert err < 2e-2, f"relative logits difference {err:.2e}"
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


@pytest.mark.gpu
def test_gca_model_with_landmarks_in_bf16_on_gpu(megatron_world):
    # DRT: the GCA Triton kernels (training form for the prompt, decode kernel for the steps), ALiBi windows; text in,
    # the landmarks inserted by the model and by its cache
    from megatron_ext.data.landmarks import insert_landmarks
    from tests.models.test_gpu import CHUNK

    torch.manual_seed(0)
    model = _gpu_model("drt_gca", bf16=True, params_dtype=torch.bfloat16).eval()
    landmark = VOCAB - 1
    fields = hf_config_fields(model.config, VOCAB, landmark_token_id=landmark)
    hf = HSAGPTForCausalLM(HSAGPTConfig(**fields)).to("cuda", torch.bfloat16).eval()
    hf.load_state_dict(hf_state_dict(model.state_dict(), tied=fields["tie_word_embeddings"]))
    n = SEQ // CHUNK * (CHUNK - 1)
    text = torch.randint(0, landmark, (2, n), generator=torch.Generator().manual_seed(3))
    ids = torch.stack([insert_landmarks({"tokens": t, "labels": t, "loss_mask": torch.ones(n)}, CHUNK, landmark,
                                        eod=0)["tokens"] for t in text]).cuda()
    text = text.cuda()
    prompt = n // 2 + 3
    with torch.no_grad():
        expected = model(ids, torch.arange(SEQ, device="cuda").expand(2, SEQ), None).float()
        full = hf(text).logits.float()[..., :landmark]
        cache = hf(text[:, :prompt], use_cache=True).past_key_values
        steps = torch.cat([hf(text[:, t:t + 1], past_key_values=cache).logits.float()[..., :landmark]
                           for t in range(prompt, n)], dim=1)
    for got, want in ((full, expected[:, ids[0] != landmark, :landmark]), (steps, full[:, prompt:])):
        err = (got - want).norm() / want.norm()
        assert err < 2e-2, f"relative logits difference {err:.2e}"
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
