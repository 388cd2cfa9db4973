"""SWA+HSA (with MoE) and DRT (GCA) models at tensor-parallel size 2 with sequence parallelism compute the same loss
and gradients as at size 1."""

import pytest
import torch

from megatron_ext.testing import gather_full_grads, run_on_ranks

SEQ, VOCAB = 64, 96

CASES = {
    "swa_hsa_moe": dict(pattern="swa [hsa swa] [hsa]", hsa_num_kv_heads=2, hsa_retrieval_heads=1, hsa_inner_swa=True,
                        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                        moe_token_dispatcher_type="allgather", moe_experts_impl="sequential"),
    "drt_gca": dict(pattern="swa [gca*2]", hsa_encoder_layers=2),
}


def _stride2_halves(t, dim, n):
    """[gate; up] split into n shards the way megatron shards a gated fc1 (partition_stride 2)."""
    a, b = t.chunk(2, dim=dim)
    return [torch.cat([x, y], dim=dim) for x, y in zip(a.chunk(n, dim=dim), b.chunk(n, dim=dim))]


def _loss_and_grads(case, full_state=None):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_ext.models import build_model
    from tests.models.tiny import tiny_config

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    spec = dict(CASES[case])
    pattern = spec.pop("pattern")
    config = tiny_config(pattern, tensor_model_parallel_size=tp, sequence_parallel=tp > 1, vocab_size=VOCAB,
                         hsa_encoder_num_query_groups=2, **spec)
    model = build_model(config)
    if full_state is None:
        full_state = {k: v.detach().clone() for k, v in model.named_parameters()}
    else:
        with torch.no_grad():
            for name, param in model.named_parameters():
                full = full_state[name]
                if getattr(param, "tensor_model_parallel", False) and tp > 1:
                    dim = param.partition_dim
                    if getattr(param, "partition_stride", 1) == 2:
                        full = _stride2_halves(full, dim, tp)[rank]
                    else:
                        full = full.chunk(tp, dim=dim)[rank]
                param.copy_(full)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    loss = ddp(tokens, torch.arange(SEQ).expand(2, SEQ), None, labels=tokens.roll(-1, 1)).float().mean()
    loss.backward()
    finalize_model_grads([ddp])
    grads = gather_full_grads(model)
    for name, param in model.named_parameters():  # undo the gated interleave of the gathered shards
        if tp > 1 and getattr(param, "partition_stride", 1) == 2 and getattr(param, "tensor_model_parallel", False):
            dim = param.partition_dim
            shards = [s.chunk(2, dim=dim) for s in grads[name].chunk(tp, dim=dim)]
            grads[name] = torch.cat([s[0] for s in shards] + [s[1] for s in shards], dim=dim)
    return loss.item(), grads, full_state


def _all_cases(full_states=None):
    """Every case in one spawned world (process start-up dominates the cost)."""
    return {case: _loss_and_grads(case, None if full_states is None else full_states[case]) for case in CASES}


def test_tp2_with_sequence_parallel_matches_tp1():
    [one_rank] = run_on_ranks(_all_cases, 1)
    weights = {case: result[2] for case, result in one_rank.items()}
    two_ranks = run_on_ranks(_all_cases, 2, weights, parallel_sizes={"tensor_model_parallel_size": 2})
    for case, (loss1, grads1, _) in one_rank.items():
        for rank_results in two_ranks:
            loss2, grads2, _ = rank_results[case]
            assert abs(loss2 - loss1) <= 1e-5 * abs(loss1), case
            assert grads2.keys() == grads1.keys()
            for name, g1 in grads1.items():
                err = (grads2[name] - g1).norm() / g1.norm().clamp_min(1e-12)
                assert err < 1e-4, f"{case} {name}: relative gradient error {err:.2e}"


def _selections(case, gumbel, cuda=False):
    """Every retrieval layer's chunk indices in one training-mode forward (Gumbel noise on or off)."""
    from megatron.core import parallel_state

    from megatron_ext.models import build_model
    from tests.models.tiny import tiny_config

    tp = parallel_state.get_tensor_model_parallel_world_size()
    spec = dict(CASES[case])
    pattern = spec.pop("pattern")
    if cuda:  # the Triton kernels and NCCL
        spec.update(use_cpu_initialization=False, hsa_kernel_backend="auto", hsa_chunk_size=16, hsa_topk=3)
    config = tiny_config(pattern, tensor_model_parallel_size=tp, sequence_parallel=tp > 1, vocab_size=VOCAB,
                         hsa_encoder_num_query_groups=2, hsa_gumbel_noise=gumbel, **spec)
    model = build_model(config).to("cuda" if cuda else "cpu")
    if parallel_state.get_tensor_model_parallel_rank() == 1:
        torch.rand(7)  # ranks' CPU generators need not agree: the selection still must
    got = []
    for layer in model.decoder.layers:
        if getattr(layer, "retrieval", None) is not None:
            layer.retrieval.register_forward_hook(lambda module, args, out: got.append(out.indices.clone()))
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0)).to("cuda" if cuda else "cpu")
    positions = torch.arange(SEQ, device=tokens.device).expand(2, SEQ)
    model(tokens, positions, None)
    # HSA: one retrieval head shared by the local KV heads
    return [(g[:, :, 0] if g.dim() == 4 else g).cpu() for g in got]


def _selections_with_and_without_noise(cuda=False):
    return {case: (_selections(case, True, cuda), _selections(case, False, cuda)) for case in CASES}


def test_gumbel_noise_picks_the_same_chunks_on_every_tp_rank():
    # Retrieval is replicated over TP: ranks that drew different noise would attend to different chunks for the
    # query heads each holds (it happened: each rank drew from its own generator).
    _check_same_selections(run_on_ranks(_selections_with_and_without_noise, 2,
                                        parallel_sizes={"tensor_model_parallel_size": 2}))


@pytest.mark.gpu
def test_gumbel_noise_picks_the_same_chunks_on_every_tp_rank_over_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _check_same_selections(run_on_ranks(_selections_with_and_without_noise, 2, True,
                                        parallel_sizes={"tensor_model_parallel_size": 2}))


def _check_same_selections(ranks):
    rank0, rank1 = ranks
    for case in CASES:
        (noisy0, plain0), (noisy1, _) = rank0[case], rank1[case]
        assert len(noisy0) == len(noisy1) > 0
        for a, b, plain in zip(noisy0, noisy1, plain0):
            assert torch.equal(a, b), case
            assert not torch.equal(a, plain), f"{case}: the noise changed no selection"
