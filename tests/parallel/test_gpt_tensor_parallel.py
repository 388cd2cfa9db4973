"""A tiny megatron-core GPT at tensor-parallel size 2 computes the same loss and gradients as at size 1."""

import torch

from megatron_ext.testing import gather_full_grads, load_full_state_into_tp_model, run_on_ranks

VOCAB, SEQ, BATCH = 128, 32, 2


def _tiny_gpt(tp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,  # GQA, so KV heads are sharded too
        ffn_hidden_size=128,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        qk_layernorm=True,
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(qk_layernorm=True),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )


def _batch():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    return tokens, labels, position_ids, causal


def _loss_and_grads(full_state=None):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = _tiny_gpt(tp)
    if full_state is None:  # the TP=1 reference: report its weights so the TP=2 run can start from them
        full_state = {k: v.detach().clone() for k, v in model.named_parameters()}
    else:
        load_full_state_into_tp_model(model, full_state)
    # Megatron DDP + finalize_model_grads, as in training: they also sum the grads of replicated parameters that
    # see only this rank's heads (QK-norm).
    ddp_model = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    tokens, labels, position_ids, mask = _batch()
    loss = ddp_model(tokens, position_ids, mask, labels=labels).float().mean()
    loss.backward()
    finalize_model_grads([ddp_model])
    return loss.item(), gather_full_grads(model), full_state


def test_tp2_matches_tp1_loss_and_grads():
    [(loss1, grads1, weights)] = run_on_ranks(_loss_and_grads, 1)
    results = run_on_ranks(
        _loss_and_grads, 2, weights, parallel_sizes={"tensor_model_parallel_size": 2}
    )
    for loss2, grads2, _ in results:
        assert abs(loss2 - loss1) <= 1e-5 * abs(loss1)
        assert grads2.keys() == grads1.keys()
        for name, g1 in grads1.items():
            g2 = grads2[name]
            assert g2.shape == g1.shape, name
            err = (g2 - g1).norm() / g1.norm().clamp_min(1e-12)
            assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"
