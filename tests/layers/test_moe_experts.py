"""Grouped-GEMM experts (megatron_ext.layers.moe_experts) against megatron-core's SequentialMLP.

The oracle is megatron-core itself: the same weights give the same outputs and gradients (CPU, fp32) as its
``SequentialMLP`` — alone on uneven and empty expert loads, and inside a full ``MoELayer`` (router with aux loss or
aux-loss-free expert bias, alltoall dispatcher, shared expert) — and dist-checkpoints move between the two modules
in both directions, at EP=1 and from EP=2 to EP=1.

``megatron_world`` (tests/layers/conftest.py) is the one-rank gloo world these tests run in.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

NUM_EXPERTS = 4
HIDDEN = 32
FFN = 16


def moe_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=64,
        moe_ffn_hidden_size=FFN,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=2,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        use_cpu_initialization=True,
        moe_token_dispatcher_type="alltoall",
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_moe_layer(experts: str, config, **spec_kwargs):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_ext.layers.moe_experts import get_moe_spec

    pg = ProcessGroupCollection.use_mpu_process_groups()
    return get_moe_spec(experts, **spec_kwargs)(config=config, pg_collection=pg)


def sequential_expert_weights(sequential_experts):
    fc1 = torch.stack([e.linear_fc1.weight for e in sequential_experts.local_experts])
    fc2 = torch.stack([e.linear_fc2.weight for e in sequential_experts.local_experts])
    return fc1, fc2


def sequential_expert_grads(sequential_experts):
    fc1 = torch.stack([e.linear_fc1.weight.grad for e in sequential_experts.local_experts])
    fc2 = torch.stack([e.linear_fc2.weight.grad for e in sequential_experts.local_experts])
    return fc1, fc2


def assert_close(actual, expected, name, rtol=1e-5, atol=1e-6):
    assert actual is not None and expected is not None, f"{name}: missing tensor"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# grouped_gemm
# ----------------------------------------------------------------------------------------------------------------
def _available_backends():
    from megatron_ext.layers.moe_experts import grouped_gemm_backend

    x, w = torch.zeros(1, 16), torch.zeros(2, 8, 16)
    return ["loop"] + (["grouped_mm"] if grouped_gemm_backend(x, w) == "grouped_mm" else [])


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_grouped_gemm_matches_per_expert_matmuls(backend):
    from megatron_ext.layers.moe_experts import grouped_gemm

    if backend not in _available_backends():
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    torch.manual_seed(0)
    counts = [5, 0, 11, 0, 3]  # uneven, empty groups in the middle and at the end
    x = torch.randn(sum(counts), 16, requires_grad=True)
    w = torch.randn(len(counts), 24, 16, requires_grad=True)
    y = grouped_gemm(x, w, torch.tensor(counts), backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)

    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rows = torch.split(x_ref, counts)
    y_ref = torch.cat([r @ w_ref[e].t() for e, r in enumerate(rows)])
    y_ref.backward(dy)
    assert_close(y, y_ref, "y")
    assert_close(x.grad, x_ref.grad, "dx")
    assert_close(w.grad, w_ref.grad, "dw")
    assert torch.all(w.grad[1] == 0) and torch.all(w.grad[3] == 0), "empty experts must get zero gradients"


def test_grouped_gemm_rejects_bad_shapes():
    from megatron_ext.layers.moe_experts import grouped_gemm

    with pytest.raises(ValueError, match="expected x"):
        grouped_gemm(torch.zeros(4, 8), torch.zeros(2, 8, 6), [2, 2])
    with pytest.raises(ValueError, match="summing to 4"):
        grouped_gemm(torch.zeros(4, 8), torch.zeros(2, 6, 8), [1, 2], backend="loop")


# ----------------------------------------------------------------------------------------------------------------
# The experts module against SequentialMLP
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize(
    "counts",
    [[7, 1, 12, 4], [0, 9, 0, 6], [0, 0, 0, 0]],
    ids=["uneven", "empty-experts", "no-tokens"],
)
def test_experts_match_sequential_mlp(megatron_world, backend, counts):
    from megatron_ext.layers.moe_experts import GroupedGemmMLP

    if backend not in _available_backends():
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    config = moe_config()
    torch.manual_seed(1)
    sequential = build_moe_layer("sequential", config).experts
    grouped = build_moe_layer("grouped_gemm", config, grouped_gemm_backend=backend).experts
    assert isinstance(grouped, GroupedGemmMLP)
    # SequentialMLP's plain state dict (local_experts.<i>.linear_fc*.weight) loads into the stacked weights.
    result = grouped.load_state_dict(sequential.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    fc1, fc2 = sequential_expert_weights(sequential)
    assert torch.equal(grouped.weight1, fc1) and torch.equal(grouped.weight2, fc2)

    n = sum(counts)
    x = torch.randn(n, HIDDEN, requires_grad=True)
    probs = torch.rand(n, requires_grad=True)
    tokens_per_expert = torch.tensor(counts)
    out_ref, bias_ref = sequential(x, tokens_per_expert, probs)
    x2, probs2 = x.detach().clone().requires_grad_(), probs.detach().clone().requires_grad_()
    out, bias = grouped(x2, tokens_per_expert, probs2)
    assert bias is None and bias_ref is None
    assert out.shape == (n, HIDDEN)
    assert_close(out, out_ref, "output")

    dy = torch.randn_like(out_ref)
    (out_ref * dy).sum().backward()
    (out * dy).sum().backward()
    assert_close(x2.grad, x.grad, "d hidden")
    assert_close(probs2.grad, probs.grad, "d probs")
    ref_fc1, ref_fc2 = sequential_expert_grads(sequential)
    assert_close(grouped.weight1.grad, ref_fc1, "d fc1")
    assert_close(grouped.weight2.grad, ref_fc2, "d fc2")


def test_experts_accept_tokens_per_expert_on_host_or_device_or_list(megatron_world):
    config = moe_config()
    torch.manual_seed(2)
    grouped = build_moe_layer("grouped_gemm", config).experts
    counts = [3, 0, 5, 2]
    x, probs = torch.randn(10, HIDDEN), torch.rand(10)
    reference, _ = grouped(x, torch.tensor(counts), probs)
    for tokens_per_expert in (counts, torch.tensor(counts, dtype=torch.int32)):
        out, _ = grouped(x, tokens_per_expert, probs)
        assert torch.equal(out, reference)


def test_experts_reject_unsupported_configs(megatron_world):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_ext.layers.moe_experts import GroupedGemmMLP

    pg = ProcessGroupCollection.use_mpu_process_groups()
    with pytest.raises(ValueError, match="add_bias_linear=False"):
        GroupedGemmMLP(NUM_EXPERTS, moe_config(add_bias_linear=True), pg_collection=pg)
    grouped = GroupedGemmMLP(NUM_EXPERTS, moe_config(), pg_collection=pg)
    with pytest.raises(ValueError, match="hidden size 8, expected 32"):
        grouped(torch.zeros(3, 8), torch.tensor([3, 0, 0, 0]), torch.ones(3))


# ----------------------------------------------------------------------------------------------------------------
# Inside megatron's MoELayer: router, dispatcher, shared expert, load balancing
# ----------------------------------------------------------------------------------------------------------------
def test_sort_tokens_by_expert_matches_megatron_permute():
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from megatron_ext.layers.moe_experts import sort_tokens_by_expert

    torch.manual_seed(6)
    tokens, experts, topk = 10, 6, 2
    scores = torch.randn(tokens, experts)
    scores[:, 3] = -10.0  # expert 3 gets no token
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
    routing_map.scatter_(1, scores.topk(topk, dim=1).indices, True)
    x = torch.randn(tokens, 5)
    permuted_ref, _, sorted_token, _, _ = permute(x, routing_map, num_out_tokens=tokens * topk)

    row_flat, token_rows, tokens_per_expert = sort_tokens_by_expert(routing_map, topk)
    row_token = row_flat % tokens
    assert torch.equal(row_token, sorted_token)
    assert torch.equal(x[row_token], permuted_ref)
    assert torch.equal(tokens_per_expert, routing_map.sum(0)) and tokens_per_expert[3] == 0
    assert torch.equal(row_flat // tokens, torch.repeat_interleave(torch.arange(experts), tokens_per_expert))
    rows = torch.randn(tokens * topk, 5)
    combined = rows[token_rows.reshape(-1)].view(tokens, topk, 5).sum(1)
    torch.testing.assert_close(combined, unpermute(rows, sorted_token, restore_shape=x.shape))


def test_chunk_sort_permutation_matches_megatron_sort_chunks():
    from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs

    from megatron_ext.layers.moe_experts import chunk_sort_permutation

    sources, experts = 3, 4
    sizes = torch.tensor([[2, 0, 3, 1], [0, 0, 4, 2], [5, 1, 0, 0]])  # rows per (source rank, local expert)
    rows = torch.randn(int(sizes.sum()), 6)
    # megatron's order: chunk (source, expert) -> (expert, source)
    order = torch.arange(sources * experts).reshape(sources, experts).t().reshape(-1)
    expected, _ = sort_chunks_by_idxs(rows, sizes.reshape(-1), order)
    perm, inverse = chunk_sort_permutation(sizes, rows.shape[0])
    assert torch.equal(rows[perm], expected)
    assert torch.equal(rows[perm][inverse], rows)


@pytest.mark.parametrize("device_permutation", [True, False], ids=["device-permutation", "megatron-dispatcher"])
@pytest.mark.parametrize(
    "balancing",
    [
        dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2),
        dict(
            moe_router_load_balancing_type="none",
            moe_router_enable_expert_bias=True,
            moe_router_score_function="sigmoid",
            moe_router_bias_update_rate=1e-2,
        ),
    ],
    ids=["aux-loss", "aux-loss-free"],
)
def test_moe_layer_matches_sequential_mlp(megatron_world, balancing, device_permutation):
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    config = moe_config(moe_shared_expert_intermediate_size=24, moe_shared_expert_overlap=True, **balancing)
    torch.manual_seed(3)
    reference = build_moe_layer("sequential", config)
    grouped = build_moe_layer("grouped_gemm", config, device_permutation=device_permutation)
    assert grouped.token_dispatcher.__class__.__name__ == (
        "GroupedAlltoAllTokenDispatcher" if device_permutation else "MoEAlltoAllTokenDispatcher"
    )
    assert getattr(grouped.token_dispatcher, "device_permutation", False) == device_permutation
    grouped.load_state_dict(reference.state_dict(), strict=True)

    hidden = torch.randn(12, 2, HIDDEN)  # [s, b, h]
    hidden[:4] *= 4.0  # skew the router toward a few experts: uneven loads
    x_ref, x = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out_ref, _ = reference(x_ref)
    out, _ = grouped(x)
    assert_close(out, out_ref, "MoE output")
    dy = torch.randn_like(out)
    (out_ref * dy).sum().backward()
    (out * dy).sum().backward()  # the aux loss (if any) reaches the router through this backward too
    assert_close(x.grad, x_ref.grad, "d hidden")
    assert_close(grouped.router.weight.grad, reference.router.weight.grad, "d router")
    ref_fc1, ref_fc2 = sequential_expert_grads(reference.experts)
    assert_close(grouped.experts.weight1.grad, ref_fc1, "d fc1")
    assert_close(grouped.experts.weight2.grad, ref_fc2, "d fc2")
    for name, param in reference.shared_experts.named_parameters():
        assert_close(dict(grouped.shared_experts.named_parameters())[name].grad, param.grad, f"d shared {name}")

    if config.moe_router_enable_expert_bias:
        # Aux-loss-free balancing: the router counts tokens per expert, and the bias update favours the
        # under-loaded experts.
        counts = grouped.router.local_tokens_per_expert
        assert torch.equal(counts, reference.router.local_tokens_per_expert) and counts.sum() == 12 * 2 * 2
        bias_before = grouped.router.expert_bias.clone()
        new_bias = get_updated_expert_bias(counts, bias_before, config.moe_router_bias_update_rate)
        assert torch.all((new_bias > bias_before) == (counts < counts.float().mean()))
    else:
        # The aux loss reaches the router's gradient: with its coefficient at 0 the gradient differs.
        without_aux = build_moe_layer("grouped_gemm", moe_config(**{**balancing, "moe_aux_loss_coeff": 0.0},
                                                                  moe_shared_expert_intermediate_size=24))
        without_aux.load_state_dict(grouped.state_dict(), strict=True)
        (without_aux(hidden.clone().requires_grad_())[0] * dy).sum().backward()
        assert not torch.allclose(without_aux.router.weight.grad, grouped.router.weight.grad)


def _compare_layers_on_rank(parallel, checkpoint_dir=None):
    """Rank body: grouped vs SequentialMLP MoE layers with the same weights under expert / expert-tensor parallelism;
    with ``checkpoint_dir``, then save the grouped layer holding :func:`_full_expert_weights` (EP=2 only)."""
    from megatron.core import parallel_state

    config = moe_config(moe_shared_expert_intermediate_size=24, moe_aux_loss_coeff=1e-2,
                        moe_router_load_balancing_type="aux_loss", **parallel)
    torch.manual_seed(11)
    reference = build_moe_layer("sequential", config)
    grouped = build_moe_layer("grouped_gemm", config)
    grouped.load_state_dict(reference.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(100 + torch.distributed.get_rank())  # different tokens on each rank
    hidden = torch.randn(8, 2, HIDDEN, generator=gen)
    x_ref, x = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out_ref, out = reference(x_ref)[0], grouped(x)[0]
    dy = torch.randn(out.shape, generator=gen)
    (out_ref * dy).sum().backward()
    (out * dy).sum().backward()
    ref_fc1, ref_fc2 = sequential_expert_grads(reference.experts)
    if checkpoint_dir is not None:
        _save_full_weights(grouped, checkpoint_dir)
    return dict(
        local_experts=grouped.experts.num_local_experts,
        fc1_rows=grouped.experts.weight1.shape[1],
        ep=parallel_state.get_expert_model_parallel_world_size(),
        device_chunk_sort=grouped.token_dispatcher.device_chunk_sort,
        out=(out - out_ref).abs().max().item(),
        dx=(x.grad - x_ref.grad).abs().max().item(),
        fc1=(grouped.experts.weight1.grad - ref_fc1).abs().max().item(),
        fc2=(grouped.experts.weight2.grad - ref_fc2).abs().max().item(),
        scale=out_ref.abs().max().item(),
    )


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    """One 2-rank EP=2 world (spawning ranks is the slow part): the comparison results and a saved checkpoint."""
    from megatron_ext.testing import run_on_ranks

    checkpoint_dir = str(tmp_path_factory.mktemp("ep2_checkpoint"))
    parallel = dict(expert_model_parallel_size=2)
    results = run_on_ranks(_compare_layers_on_rank, 2, parallel, checkpoint_dir, parallel_sizes=parallel)
    return results, checkpoint_dir


def _assert_same_as_sequential(results):
    for rank, result in enumerate(results):
        assert result["device_chunk_sort"], "received tokens must be regrouped on the device"
        assert result["scale"] > 0
        for name in ("out", "dx", "fc1", "fc2"):
            assert result[name] < 1e-5, f"rank {rank}: {name} differs by {result[name]}"


def test_moe_layer_matches_sequential_mlp_at_ep2(ep2_run):
    results, _ = ep2_run
    assert all(r["local_experts"] == NUM_EXPERTS // 2 and r["ep"] == 2 for r in results)
    _assert_same_as_sequential(results)


def test_moe_layer_matches_sequential_mlp_at_expert_tp2():
    from megatron_ext.testing import run_on_ranks

    parallel = dict(expert_tensor_parallel_size=2)
    results = run_on_ranks(_compare_layers_on_rank, 2, parallel, parallel_sizes=parallel)
    assert all(r["fc1_rows"] == 2 * FFN // 2 for r in results)  # fc1 split over the two expert-TP ranks
    _assert_same_as_sequential(results)


def test_gpt_with_grouped_moe_trains_with_megatron_optimizer_and_expert_bias(megatron_world):
    """End to end through megatron's training path: GPTModel with the grouped MoE slot, DDP, distributed optimizer,
    forward_backward_no_pipelining and finalize_model_grads (which moves the aux-loss-free expert bias)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.layers.moe_experts import GroupedGemmMLP, get_moe_spec

    config = moe_config(
        num_layers=2,
        normalization="RMSNorm",
        moe_router_load_balancing_type="none",
        moe_router_enable_expert_bias=True,
        moe_router_score_function="sigmoid",
        moe_router_bias_update_rate=1e-2,
    )
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, normalization="RMSNorm")
    spec.submodules.mlp = get_moe_spec("grouped_gemm")
    torch.manual_seed(8)
    model = GPTModel(config, spec, vocab_size=64, max_sequence_length=16, position_embedding_type="rope")
    model = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [model]
    )
    config.finalize_model_grads_func = finalize_model_grads
    layers = model.module.decoder.layers
    assert all(isinstance(layer.mlp.experts, GroupedGemmMLP) for layer in layers)

    batch = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(9))
    position_ids = torch.arange(16).unsqueeze(0).expand(2, -1)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])
        return loss, lambda out: (out.sum(), torch.tensor(out.numel()), {"loss": out.detach().mean()})

    losses = []
    try:
        for _ in range(4):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
                seq_length=16, micro_batch_size=2, forward_only=False,
            )
            optimizer.step()
            losses.append(float(out[0]["loss"]))
    finally:
        config.finalize_model_grads_func = None
    assert losses[-1] < losses[0] - 0.1, f"loss did not go down: {losses}"
    for layer in layers:
        bias = layer.mlp.router.expert_bias
        assert torch.count_nonzero(bias) > 0, "finalize_model_grads must have updated the expert bias"


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def _sharded_layout(sharded_state_dict):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    apply_factories(sharded_state_dict)
    return sorted(
        (
            type(v).__name__,
            v.key,
            tuple(getattr(v, "global_shape", ())),
            tuple(v.global_offset),
            tuple(getattr(v, "axis_fragmentations", ())),
            tuple(v.replica_id),
        )
        for v in nested_values(sharded_state_dict)
    )


def test_sharded_layout_equals_sequential_mlp(megatron_world):
    config = moe_config()
    sequential = build_moe_layer("sequential", config)
    grouped = build_moe_layer("grouped_gemm", config)
    prefix = "decoder.layers.0.mlp."
    assert _sharded_layout(grouped.sharded_state_dict(prefix)) == _sharded_layout(
        sequential.sharded_state_dict(prefix)
    )


@pytest.mark.parametrize("direction", ["sequential->grouped", "grouped->sequential"])
def test_dist_checkpoint_round_trip(megatron_world, tmp_path, direction):
    from megatron.core import dist_checkpointing

    config = moe_config()
    source_kind, target_kind = direction.split("->")
    kinds = {"sequential": "sequential", "grouped": "grouped_gemm"}
    torch.manual_seed(4)
    source = build_moe_layer(kinds[source_kind], config)
    torch.manual_seed(5)  # a different init: the load must overwrite every weight
    target = build_moe_layer(kinds[target_kind], config)
    prefix = "decoder.layers.0.mlp."

    dist_checkpointing.save(source.sharded_state_dict(prefix), str(tmp_path))
    loaded = dist_checkpointing.load(target.sharded_state_dict(prefix), str(tmp_path))
    target.load_state_dict({k[len(prefix) :]: v for k, v in loaded.items()}, strict=True)

    if source_kind == "sequential":
        fc1, fc2 = sequential_expert_weights(source.experts)
        assert torch.equal(target.experts.weight1, fc1) and torch.equal(target.experts.weight2, fc2)
    else:
        fc1, fc2 = sequential_expert_weights(target.experts)
        assert torch.equal(fc1, source.experts.weight1) and torch.equal(fc2, source.experts.weight2)
    assert torch.equal(target.router.weight, source.router.weight)
    x = torch.randn(6, 2, HIDDEN)
    assert_close(target(x)[0], source(x)[0], "output after the checkpoint round trip")


def _save_full_weights(layer, checkpoint_dir):
    """Give an EP=2 grouped layer its slice of :func:`_full_expert_weights` and save it."""
    from megatron.core import dist_checkpointing, parallel_state

    full_fc1, full_fc2 = _full_expert_weights()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    local = slice(ep_rank * NUM_EXPERTS // 2, (ep_rank + 1) * NUM_EXPERTS // 2)
    with torch.no_grad():
        layer.experts.weight1.copy_(full_fc1[local])
        layer.experts.weight2.copy_(full_fc2[local])
        layer.router.weight.fill_(0.5)
    dist_checkpointing.save(layer.sharded_state_dict("mlp."), checkpoint_dir)


def _full_expert_weights():
    gen = torch.Generator().manual_seed(7)
    return (
        torch.randn(NUM_EXPERTS, 2 * FFN, HIDDEN, generator=gen),
        torch.randn(NUM_EXPERTS, HIDDEN, FFN, generator=gen),
    )


def test_checkpoint_from_ep2_grouped_loads_into_ep1_sequential(megatron_world, ep2_run):
    from megatron.core import dist_checkpointing

    _, checkpoint_dir = ep2_run
    config = moe_config(moe_shared_expert_intermediate_size=24)  # the saved layer's shapes
    sequential = build_moe_layer("sequential", config)
    loaded = dist_checkpointing.load(sequential.sharded_state_dict("mlp."), checkpoint_dir)
    sequential.load_state_dict({k[len("mlp.") :]: v for k, v in loaded.items()}, strict=True)
    fc1, fc2 = sequential_expert_weights(sequential.experts)
    full_fc1, full_fc2 = _full_expert_weights()
    assert torch.equal(fc1, full_fc1) and torch.equal(fc2, full_fc2)
    assert torch.all(sequential.router.weight == 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------------------------
def test_get_moe_spec_choice(megatron_world):
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_ext.layers.moe_experts import GroupedGemmMLP, get_moe_spec, te_available

    auto = build_moe_layer("auto", moe_config())
    assert isinstance(auto, MoELayer)
    if te_available():
        from megatron.core.transformer.moe.experts import TEGroupedMLP

        assert isinstance(auto.experts, TEGroupedMLP)
    else:
        assert isinstance(auto.experts, GroupedGemmMLP)
        with pytest.raises(ValueError, match="needs Transformer Engine"):
            get_moe_spec("te")
    assert isinstance(build_moe_layer("sequential", moe_config()).experts, SequentialMLP)
    with pytest.raises(ValueError, match="unknown experts"):
        get_moe_spec("fast")


@pytest.mark.gpu
def test_grouped_gemm_bf16_on_cuda_matches_fp32_loop():
    """The CUTLASS grouped GEMM (bf16, Hopper) on uneven and empty expert loads, forward and gradients."""
    from megatron_ext.layers.moe_experts import grouped_gemm, grouped_gemm_backend

    torch.manual_seed(0)
    counts = torch.tensor([37, 0, 301, 1, 0, 128, 5, 0])
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(len(counts), 512, 256, device="cuda", dtype=torch.bfloat16) / 16).requires_grad_()
    if grouped_gemm_backend(x, w) != "grouped_mm":
        pytest.skip("torch._grouped_mm needs a Hopper-class GPU")
    y = grouped_gemm(x, w, counts.cuda())
    dy = torch.randn_like(y)
    y.backward(dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y32 = grouped_gemm(x32, w32, counts, backend="loop")
    y32.backward(dy.float())
    for name, got, want in (("y", y, y32), ("dx", x.grad, x32.grad), ("dw", w.grad, w32.grad)):
        rel = (got.float() - want).norm() / want.norm()
        assert rel < 1e-2, f"{name}: relative error {rel:.3g}"
    assert torch.all(w.grad[counts.cuda() == 0] == 0), "empty experts must get zero gradients"
