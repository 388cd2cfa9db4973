"""The parallel-equivalence driver: train one tiny model under a parallel layout and report what it computed.

A check runs like this (see ``test_layouts.py``):

1. the reference, one rank: build the model, save its initial weights with ``dist_checkpointing`` (``init/``),
   train ``STEPS`` optimizer steps, record per-step losses and full gradients, save after step 2 (``step2/``);
2. each layout X in one spawned 2-rank world: build the model at X, *load* ``init/`` (so the weights are the
   reference's, and loading resharded them), train the same steps on the same global batches, record losses and
   gradients gathered back to the global (TP=1) layout by checkpoint key, save after step 2 and evaluate the
   step-3 batch from the reference's ``step2/`` (1 -> X resharding of a mid-training checkpoint);
3. back on one rank: load X's ``step2/`` and evaluate the step-3 batch (X -> 1).

Training is megatron-core's: ``DistributedDataParallel``, ``get_megatron_optimizer`` (Adam, grad clipping),
``get_forward_backward_func`` schedules with ``finalize_model_grads``, per-token loss averaging. Every rank of a
data-parallel group takes its own micro-batches of the global batch, so layouts with DP>1 (e.g. EP=2 on two ranks)
see the same global batch as one rank.

Model builders are named (``MODEL_BUILDERS``) so that spawned ranks can rebuild them from a string.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from megatron_ext.parallel.global_tensors import gather_global_tensors, replica_mismatches, unwrap_model

STEPS = 3
SAVE_AFTER_STEP = 2
NUM_MICROBATCHES = 4  # global batch = 4 sequences of micro-batch 1: DP=2 ranks take 2 each, PP=2 pipelines 4
VOCAB = 128
SEQ = 32
LR = 1e-2
# Adam's first steps move every weight by about lr*sign(grad): a gradient that is 0 in exact arithmetic is +-1e-9 in
# fp32, with a sign that depends on the reduction order of the layout, and Adam turns it into a +-lr jump. An eps
# well above that noise (and below the real gradients, ~1e-3) keeps the update continuous in the gradient.
ADAM_EPS = 1e-5


@dataclass(frozen=True)
class Layout:
    """One parallel layout of a 1- or 2-rank world. ``config`` holds extra model-config overrides."""

    name: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    sp: bool = False
    vpp: int | None = None
    config: dict = field(default_factory=dict)

    def parallel_sizes(self) -> dict:
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=1,
        )

    def config_overrides(self) -> dict:
        overrides = dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=1,
            sequence_parallel=self.sp,
            calculate_per_token_loss=True,
        )
        if self.pp > 1:
            overrides["pipeline_dtype"] = torch.float32
        overrides.update(self.config)
        return overrides


SINGLE_RANK = Layout("single")


# ----------------------------------------------------------------------------------------------------------------
# Tiny models. Each builder: (config_overrides, pre_process, post_process, vp_stage) -> model.
# ----------------------------------------------------------------------------------------------------------------
def _local_spec_with_sp_norms(num_experts=None):
    """megatron's local (non-TE) layer spec with the project's SP-capable RMSNorm in every norm slot."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_ext.layers.norms import RMSNorm

    sub = get_gpt_layer_local_submodules(num_experts=num_experts, qk_layernorm=True, normalization="RMSNorm")
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    sub.self_attention.submodules.q_layernorm = RMSNorm
    sub.self_attention.submodules.k_layernorm = RMSNorm
    return ModuleSpec(module=TransformerLayer, submodules=sub)


def _gpt_block_spec(config, num_experts, vp_stage):
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from megatron_ext.layers.norms import RMSNorm

    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[_local_spec_with_sp_norms(num_experts)] * n, layer_norm=RMSNorm)


def _tiny_gpt_config(overrides, **extra):
    from megatron.core.transformer import TransformerConfig

    fields = dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        qk_layernorm=True,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        gated_linear_unit=True,  # SwiGLU: the fused [gate; up] fc1 reshards through a checkpoint factory
        activation_func=torch.nn.functional.silu,
        params_dtype=torch.float32,
    )
    fields.update(extra)
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_tiny_gpt(overrides, pre_process=True, post_process=True, vp_stage=None):
    from megatron.core.models.gpt import GPTModel

    config = _tiny_gpt_config(overrides)
    return GPTModel(
        config,
        _gpt_block_spec(config, None, vp_stage),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )


_AUX_LOSS = dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2)
# DeepSeek-V3 style: sigmoid scores, no auxiliary loss, a per-expert bias updated from the load after each step.
_AUX_LOSS_FREE = dict(
    moe_router_load_balancing_type="none",
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_bias_update_rate=1e-2,
)


def build_tiny_moe(overrides, pre_process=True, post_process=True, vp_stage=None, balancing=None):
    """4 experts, top-2, a shared expert; the dispatcher comes from the overrides (alltoall by default)."""
    from megatron.core.models.gpt import GPTModel

    config = _tiny_gpt_config(
        overrides,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
        moe_shared_expert_intermediate_size=64,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type=overrides.get("moe_token_dispatcher_type", "alltoall"),
        **(balancing or _AUX_LOSS),
    )
    return GPTModel(
        config,
        _gpt_block_spec(config, 4, vp_stage),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )


# Retrieval models (megatron_ext.models.build_model). Patterns of 4 layers so that PP=2 splits them 2+2 with the
# chunk memory made in stage 0 and used in stage 1; the bracketed retrieval group spans both stages, so the group's
# selection crosses the boundary too.
RETRIEVAL_CHUNK = 4
RETRIEVAL_MODELS = {
    "swa_hsa": dict(layer_pattern="swa [hsa swa hsa]", hsa_num_kv_heads=2, hsa_retrieval_heads=2, hsa_inner_swa=True,
                    hsa_rank_decay=True, hsa_landmark_norm=True),
    # Gumbel-perturbed top-k in training (the 8B-A1B's setting): replicated retrieval must draw the same noise on
    # every TP/CP rank, else the ranks' selections (and gradients of the replicated weights) disagree.
    "swa_hsa_gumbel": dict(layer_pattern="swa [hsa swa hsa]", hsa_num_kv_heads=2, hsa_retrieval_heads=2,
                           hsa_gumbel_noise=True),
    "swa_hsa_no_decoder_qk_norm": dict(layer_pattern="swa [hsa swa hsa]", hsa_num_kv_heads=2, qk_layernorm=False,
                                       hsa_qk_norm=True),
    "swa_hsa_shared_retrieval": dict(layer_pattern="swa [hsa swa hsa]", hsa_num_kv_heads=2, hsa_retrieval_heads=1),
    # One KV head (the 8B-A1B's Hk=1): at TP=2 the memory K/V is replicated and the query heads are split.
    "swa_hsa_one_kv_head": dict(layer_pattern="swa [hsa swa hsa]", hsa_num_kv_heads=1, hsa_inner_swa=True),
    "gca": dict(layer_pattern="swa [gca swa gca]", hsa_encoder_layers=1),
    # The fused Triton RMSNorm, RoPE and vocab-parallel cross entropy (interpreter on CPU) in every layer and the loss.
    "swa_hsa_fused": dict(layer_pattern="swa [hsa swa hsa]", hsa_num_kv_heads=2, hsa_inner_swa=True,
                          fused_kernel_backend="triton"),
    # The 8B-A1B's shape in miniature: MoE on every layer (the project's grouped-GEMM experts, a shared expert,
    # alltoall dispatch, aux loss) under SWA + HSA with one KV head.
    "swa_hsa_moe": dict(layer_pattern="swa [hsa swa hsa]", hsa_num_kv_heads=1, hsa_inner_swa=True,
                        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                        moe_shared_expert_intermediate_size=32, moe_token_dispatcher_type="alltoall",
                        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2),
}


def build_retrieval_model(overrides, pre_process=True, post_process=True, vp_stage=None, family="swa_hsa"):
    from megatron_ext.models.builder import build_model
    from tests.models.tiny import tiny_config

    fields = dict(seq_length=SEQ, hsa_chunk_size=RETRIEVAL_CHUNK, vocab_size=VOCAB,
                  activation_func=torch.nn.functional.silu, params_dtype=torch.float32)
    fields.update(RETRIEVAL_MODELS[family])
    fields.update(overrides)
    config = tiny_config(fields.pop("layer_pattern"), **fields)
    return build_model(config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


MODEL_BUILDERS: dict[str, Callable] = {
    **{family: partial(build_retrieval_model, family=family) for family in RETRIEVAL_MODELS},
    "gpt": build_tiny_gpt,
    "moe": build_tiny_moe,
    "moe_aux_free": partial(build_tiny_moe, balancing=_AUX_LOSS_FREE),
}


def register_model_builder(name: str, builder: Callable) -> None:
    MODEL_BUILDERS[name] = builder


# ----------------------------------------------------------------------------------------------------------------
# Data: the same global batches for every layout.
# ----------------------------------------------------------------------------------------------------------------
def global_batches(steps: int = STEPS, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> list[list[dict]]:
    """batches[step][microbatch] = {"tokens": [1, s], "labels": [1, s]} (int64)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(NUM_MICROBATCHES):
            tokens = torch.randint(0, vocab, (1, seq + 1), generator=gen)
            step.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
        out.append(step)
    return out


def _this_rank_microbatches(step_batches: list[dict]) -> list[dict]:
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    if len(step_batches) % dp:
        raise ValueError(f"{len(step_batches)} micro-batches cannot be split over {dp} data-parallel ranks")
    n = len(step_batches) // dp
    return step_batches[dp_rank * n : (dp_rank + 1) * n]


def _forward_step(model_inputs_fn, data_iterator, model):
    from megatron.core import parallel_state

    from megatron_ext.parallel.context import split_for_context_parallel

    batch = next(data_iterator)
    tokens, labels, position_ids, attention_mask = model_inputs_fn(batch)
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size > 1:  # megatron's CP layout: this rank's two pieces of the sequence
        if attention_mask is not None:
            raise ValueError("context parallelism here needs a model that takes no explicit mask")
        cp_rank = parallel_state.get_context_parallel_rank()
        tokens, labels, position_ids = (
            split_for_context_parallel(t, 1, cp_rank, cp_size) for t in (tokens, labels, position_ids)
        )
    per_token_loss = model(tokens, position_ids, attention_mask, labels=labels)

    def loss_func(output):
        loss_sum = output.float().sum()
        num_tokens = torch.tensor(output.numel(), dtype=torch.int)
        return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

    return per_token_loss, loss_func


def default_model_inputs(batch):
    """tokens, labels, position_ids and a causal mask for a GPTModel (no context parallelism)."""
    tokens, labels = batch["tokens"], batch["labels"]
    s = tokens.shape[1]
    position_ids = torch.arange(s).unsqueeze(0).expand_as(tokens)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    return tokens, labels, position_ids, causal


def unmasked_model_inputs(batch):
    """As :func:`default_model_inputs` without a mask: our core attentions are causal by construction."""
    tokens, labels, position_ids, _ = default_model_inputs(batch)
    return tokens, labels, position_ids, None


MODEL_INPUTS: dict[str, Callable] = {"default": default_model_inputs, "unmasked": unmasked_model_inputs}
MODEL_INPUTS_OF: dict[str, str] = {family: "unmasked" for family in RETRIEVAL_MODELS}  # model -> MODEL_INPUTS key


# ----------------------------------------------------------------------------------------------------------------
# One layout's run.
# ----------------------------------------------------------------------------------------------------------------
def _init_layout(layout: Layout, seed: int) -> None:
    from megatron_ext.testing import initialize_megatron_parallel, teardown_megatron_parallel

    teardown_megatron_parallel()
    world = torch.distributed.get_world_size()
    model_parallel = layout.tp * layout.pp * layout.cp
    if world % model_parallel or world % (layout.ep * layout.pp):
        raise ValueError(f"layout {layout.name} does not fit a world of {world} ranks")
    initialize_megatron_parallel(seed=seed, **layout.parallel_sizes())


def build_model_chunks(model_name: str, layout: Layout) -> list[torch.nn.Module]:
    from megatron.core import parallel_state

    builder = MODEL_BUILDERS[model_name]
    overrides = layout.config_overrides()
    chunks = []
    for vp_stage in range(layout.vpp or 1):
        vp = vp_stage if layout.vpp else None
        chunks.append(
            builder(
                overrides,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                vp_stage=vp,
            )
        )
    return chunks


def _sharded_state_dict(chunks) -> dict:
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_checkpoint(chunks, directory: str) -> None:
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state_dict(chunks), directory)


def load_checkpoint(chunks, directory: str) -> None:
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_sharded_state_dict(chunks), directory)
    for i, chunk in enumerate(chunks):
        unwrap_model(chunk).load_state_dict(loaded[f"model{i}"], strict=True)


def _step_loss(loss_dicts) -> float:
    """Global per-token loss of one step: summed over micro-batches and data/context-parallel ranks."""
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64)
    if loss_dicts and parallel_state.get_tensor_model_parallel_rank() == 0:
        for d in loss_dicts:
            total += d["lm loss"].detach().double().cpu()
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def _run_schedule(chunks, layout, step_batches, inputs_fn, forward_only):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mine = _this_rank_microbatches(step_batches)
    iterators = [iter(mine) for _ in chunks] if layout.vpp else iter(mine)
    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, inputs_fn),
        data_iterator=iterators,
        model=chunks if layout.vpp else chunks[0],
        num_microbatches=len(mine),
        seq_length=mine[0]["tokens"].shape[1] // (layout.tp if layout.sp else 1) // layout.cp,
        micro_batch_size=1,
        forward_only=forward_only,
    )
    return _step_loss(losses)


def train_layout(
    model_name: str,
    layout: Layout,
    init_dir: str,
    *,
    steps: int = STEPS,
    save_dir: str | None = None,
    eval_dir: str | None = None,
    inputs: str = "default",
    seed: int = 1234,
) -> dict:
    """Train ``steps`` steps of ``model_name`` at ``layout`` from the weights in ``init_dir``.

    Returns {"losses": [per step], "grads": [per step {key: full fp32 grad}], "eval_loss": loss of the last
    step's batch with the weights of ``eval_dir`` (or None)}. Saves a checkpoint after step ``SAVE_AFTER_STEP``
    into ``save_dir`` when given. Collective over the world; every rank returns the same values.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    _init_layout(layout, seed)
    inputs_fn = MODEL_INPUTS[inputs]
    batches = global_batches(steps)
    chunks = build_model_chunks(model_name, layout)
    load_checkpoint(chunks, init_dir)
    config = unwrap_model(chunks[0]).config
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False)
    chunks = [
        DistributedDataParallel(config, ddp_config, c, disable_bucketing=(i > 0)) for i, c in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=LR, adam_eps=ADAM_EPS, weight_decay=0.01, clip_grad=1.0, params_dtype=torch.float32
        ),
        chunks,
    )
    config.finalize_model_grads_func = finalize_model_grads
    losses, grads, grad_replica_errors, grad_norms, debug_params = [], [], [], [], []
    save_seconds = None
    for step in range(steps):
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        losses.append(_run_schedule(chunks, layout, batches[step], inputs_fn, forward_only=False))
        step_grads = gather_global_tensors(chunks, "grad")
        grads.append(step_grads)
        grad_replica_errors.append(replica_mismatches(chunks, step_grads, "grad"))
        ok, grad_norm, _ = optimizer.step()
        grad_norms.append(float(grad_norm))
        if os.environ.get("EQUIVALENCE_DEBUG_PARAMS"):
            debug_params.append(gather_global_tensors(chunks, "param"))
        if not ok:
            raise RuntimeError(f"{layout.name}: optimizer step {step} was skipped")
        if save_dir is not None and step + 1 == SAVE_AFTER_STEP:
            t0 = time.perf_counter()
            save_checkpoint(chunks, save_dir)
            save_seconds = time.perf_counter() - t0
    params = gather_global_tensors(chunks, "param")
    param_replica_errors = replica_mismatches(chunks, params, "param")
    eval_loss = None
    if eval_dir is not None:
        load_checkpoint(chunks, eval_dir)
        eval_loss = _run_schedule(chunks, layout, batches[SAVE_AFTER_STEP], inputs_fn, forward_only=True)
    return {
        "losses": losses,
        "grads": grads,
        "grad_norms": grad_norms,
        "debug_params": debug_params,
        "grad_replica_errors": grad_replica_errors,
        "param_replica_errors": param_replica_errors,
        "final_params": params,
        "eval_loss": eval_loss,
        "save_seconds": save_seconds,
    }


def evaluate_checkpoint(model_name: str, layout: Layout, ckpt_dir: str, step: int = SAVE_AFTER_STEP, seed=1234):
    """Loss of global batch ``step`` with the weights of ``ckpt_dir``, at ``layout`` (forward only)."""
    inputs = MODEL_INPUTS_OF.get(model_name, "default")
    _init_layout(layout, seed)
    chunks = build_model_chunks(model_name, layout)
    load_checkpoint(chunks, ckpt_dir)
    return _run_schedule(chunks, layout, global_batches(step + 1)[step], MODEL_INPUTS[inputs], forward_only=True)


def make_reference(model_name: str, root: str, *, seed: int = 1234) -> dict:
    """One rank: save initial weights to ``root/init``, train, save ``root/step2``. Needs a 1-rank world."""
    inputs = MODEL_INPUTS_OF.get(model_name, "default")
    _init_layout(SINGLE_RANK, seed)
    init_dir = os.path.join(root, "init")
    save_checkpoint(build_model_chunks(model_name, SINGLE_RANK), init_dir)
    result = train_layout(model_name, SINGLE_RANK, init_dir, save_dir=os.path.join(root, "step2"), inputs=inputs)
    result["init_dir"] = init_dir
    result["step2_dir"] = os.path.join(root, "step2")
    return result


def run_layouts(jobs: list[tuple[str, Layout, str]]) -> dict:
    """In one spawned world: each (model_name, layout, reference_root) job in turn, parallel state re-initialised
    for each. A job trains from ``root/init``, saves ``root/<layout>/step2`` and evaluates ``root/step2``.
    Returns {(model_name, layout_name): result}."""
    results = {}
    for model_name, layout, root in jobs:
        start = time.perf_counter()
        save_dir = os.path.join(root, layout.name, "step2")
        result = train_layout(
            model_name,
            layout,
            os.path.join(root, "init"),
            save_dir=save_dir,
            eval_dir=os.path.join(root, "step2"),
            inputs=MODEL_INPUTS_OF.get(model_name, "default"),
        )
        result["step2_dir"] = save_dir
        result["seconds"] = time.perf_counter() - start
        results[(model_name, layout.name)] = result
    # Layout -> layout: each layout's step-2 checkpoint evaluated at the model's next layout (cyclically), e.g.
    # TP2 -> PP2 -> CP2 -> TP2. Compare with the saving layout's own step-3 loss.
    by_model: dict[str, list[Layout]] = {}
    for model_name, layout, _ in jobs:
        by_model.setdefault(model_name, []).append(layout)
    for model_name, layouts in by_model.items():
        if len(layouts) < 2:
            continue
        for i, source in enumerate(layouts):
            target = layouts[(i + 1) % len(layouts)]
            loss = evaluate_checkpoint(model_name, target, results[(model_name, source.name)]["step2_dir"])
            results[(model_name, source.name)]["loaded_at_next_layout"] = (target.name, loss)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Comparisons.
# ----------------------------------------------------------------------------------------------------------------
def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def assert_same_losses(losses, reference, rtol=1e-5, what="loss"):
    assert len(losses) == len(reference), f"{what}: {len(losses)} steps vs {len(reference)}"
    for step, (a, b) in enumerate(zip(losses, reference)):
        assert abs(a - b) <= rtol * abs(b), f"{what} step {step + 1}: {a:.8f} vs reference {b:.8f}"


def assert_same_grads(grads, reference, rtol=1e-5, atol=1e-8):
    """Per tensor: |g - ref| <= rtol * |ref| + atol (norms). atol covers gradients that nearly cancel (a scalar
    like HSA's rank decay starts at ~1e-6, where fp32 reduction order alone moves it by ~1e-10)."""
    for step, (g, ref) in enumerate(zip(grads, reference)):
        assert g.keys() == ref.keys(), (
            f"step {step + 1}: gradient keys differ: only here {sorted(g.keys() - ref.keys())}, "
            f"only in reference {sorted(ref.keys() - g.keys())}"
        )
        for key, r in ref.items():
            assert g[key].shape == r.shape, f"step {step + 1} {key}: shape {tuple(g[key].shape)} vs {tuple(r.shape)}"
            assert r.norm() > 0 or key.endswith("expert_bias"), f"step {step + 1} {key}: reference gradient is zero"
            diff = (g[key] - r).norm().item()
            assert diff <= rtol * r.norm().item() + atol, (
                f"step {step + 1} {key}: gradient differs by {diff:.2e} (relative {relative_error(g[key], r):.2e})"
            )


__all__ = [
    "Layout",
    "SINGLE_RANK",
    "MODEL_BUILDERS",
    "MODEL_INPUTS",
    "register_model_builder",
    "train_layout",
    "evaluate_checkpoint",
    "make_reference",
    "run_layouts",
    "MODEL_INPUTS_OF",
    "assert_same_losses",
    "assert_same_grads",
]
