"""Grouped-GEMM experts for megatron-core's ``MoELayer``, fast without Transformer Engine.

Without TE, megatron-core's local spec computes the routed experts with ``SequentialMLP``: a Python loop that runs
one small ``Linear -> SwiGLU -> Linear`` per expert. :class:`GroupedGemmMLP` computes all local experts at once:

    tokens sorted by expert  x: [N, H]      (megatron's token dispatcher does the sorting)
    fc1   h = grouped_gemm(x, weight1, tokens_per_expert)        weight1: [E_local, 2F/ETP, H]  ([gate; up])
    act   a = silu(gate(h)) * up(h) * routing prob               (megatron's SwiGLU, probs applied as experts do)
    fc2   y = grouped_gemm(a, weight2, tokens_per_expert)        weight2: [E_local, H, F/ETP]

``grouped_gemm`` runs ``torch._grouped_mm`` (one CUTLASS kernel for all experts on Hopper; torch's own CPU kernel
where it exists) and falls back to a loop over experts elsewhere. The expert offsets stay on the device: no host
sync per expert.

Parallelism and checkpoints are megatron's: experts are split over the expert-parallel group (the dispatcher sends
each rank the tokens of its ``num_local_experts`` experts), fc1/fc2 over the expert-tensor-parallel group (column /
row parallel, the dispatcher gathers and reduce-scatters), and ``sharded_state_dict`` writes exactly the sharded
tensors ``SequentialMLP`` writes (``...experts.experts.linear_fc1.weight`` of global shape ``[E, 2F, H]`` with the
SwiGLU halves sharded as megatron shards them), so a dist-checkpoint moves between the two modules in both
directions. A plain ``state_dict`` of ``SequentialMLP`` (``local_experts.<i>.linear_fc{1,2}.weight``) also loads.

:func:`get_moe_spec` returns the MoE slot of a layer spec: TE's ``TEGroupedMLP`` when Transformer Engine is
installed, these experts otherwise, in ``GroupedGemmMoELayer`` (megatron's ``MoELayer`` whose alltoall dispatcher
permutes tokens on the device when there is a single expert-parallel rank: no host sync, no loop over experts, no
atomics; with expert or expert-tensor parallelism megatron's all-to-all / all-gather, the received tokens regrouped
by expert with one device gather instead of megatron's Python loop over (rank, expert) chunks).
"""

from __future__ import annotations

import functools
import re
from functools import partial
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import get_pg_rank, get_pg_size, make_tp_sharded_tensor_for_checkpoint

from megatron_ext.compat.optional import te_available

__all__ = [
    "GroupedGemmMLP",
    "grouped_moe_classes",
    "sort_tokens_by_expert",
    "chunk_sort_permutation",
    "grouped_gemm",
    "grouped_gemm_backend",
    "get_moe_spec",
    "te_available",
]

GroupedGemmBackend = Literal["auto", "grouped_mm", "loop"]


# ----------------------------------------------------------------------------------------------------------------
# Grouped GEMM: y[rows of expert e] = x[rows of expert e] @ weight[e]^T
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _cpu_grouped_mm_works(dtype: torch.dtype) -> bool:
    """torch >= 2.9 ships a CPU ``_grouped_mm``; probe it once (forward and backward, with an empty group)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(4, 16, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 8, 16, dtype=dtype, requires_grad=True)
        y = _GroupedMatmul.apply(x, w, torch.tensor([0, 4], dtype=torch.int32))
        y.backward(torch.ones_like(y))
        return (
            bool(torch.all(y == 16))
            and bool(torch.all(w.grad[0] == 0))
            and bool(torch.all(w.grad[1] == 4))
            and bool(torch.all(x.grad == 8))
        )
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def grouped_gemm_backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The backend ``backend="auto"`` picks for these operands: ``"grouped_mm"`` or ``"loop"``."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return "loop"
    # 16-byte aligned rows for the TMA loads of the CUTLASS kernel (and torch's stride checks).
    if (x.shape[-1] * x.element_size()) % 16 or (weight.shape[1] * weight.element_size()) % 16:
        return "loop"
    if x.is_cuda:
        major, _ = torch.cuda.get_device_capability(x.device)
        return "grouped_mm" if (x.dtype == torch.bfloat16 and major >= 9) else "loop"
    if x.device.type == "cpu" and _cpu_grouped_mm_works(x.dtype):
        return "grouped_mm"
    return "loop"


def grouped_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    tokens_per_expert: torch.Tensor | Sequence[int],
    *,
    offsets: Optional[torch.Tensor] = None,
    backend: GroupedGemmBackend = "auto",
) -> torch.Tensor:
    """Per-expert ``x_e @ weight[e].T`` over rows grouped by expert.

    Args:
        x: [N, K] rows sorted by expert (expert 0's rows first).
        weight: [E, M, K] one ``Linear`` weight per expert.
        tokens_per_expert: [E] row counts (summing to N), a tensor on any device or a list.
        offsets: optional [E] int32 cumulative row counts on ``x``'s device (computed if absent).
        backend: ``"grouped_mm"`` (``torch._grouped_mm``), ``"loop"`` (one matmul per expert; needs the counts on
            the host) or ``"auto"``.
    Returns: [N, M].
    """
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(
            f"grouped_gemm: expected x [N, K] and weight [E, M, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    num_experts = weight.shape[0]
    if backend == "auto":
        backend = grouped_gemm_backend(x, weight) if x.shape[0] > 0 else "loop"
    if backend == "grouped_mm":
        if offsets is None:
            offsets = expert_offsets(tokens_per_expert, num_experts, x.device)
        return _GroupedMatmul.apply(x, weight, offsets)
    if backend != "loop":
        raise ValueError(f"grouped_gemm: unknown backend {backend!r}; use 'auto', 'grouped_mm' or 'loop'")
    counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
    if len(counts) != num_experts or sum(counts) != x.shape[0]:
        raise ValueError(
            f"grouped_gemm: tokens_per_expert {counts} must have {num_experts} entries summing to {x.shape[0]}"
        )
    # unbind: one backward op stacks all expert gradients (indexing would add a full-size gradient per expert).
    return torch.cat([xe @ we.t() for xe, we in zip(torch.split(x, counts), weight.unbind(0))], dim=0)


class _GroupedMatmul(torch.autograd.Function):
    """``torch._grouped_mm(x, weight^T)`` whose weight gradient comes out in the weight's own layout.

    torch's built-in derivative returns the gradient of ``weight.transpose(1, 2)``, i.e. a transposed [E, M, K]
    tensor, which autograd then copies into the parameter's layout (a full extra pass over every expert weight) and
    megatron adds into ``main_grad`` with strided reads. Here ``dW = grouped_mm(dY^T, X)`` is [E, M, K] directly.
    """

    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight, offsets)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch._grouped_mm(grad_out, weight, offs=offsets) if ctx.needs_input_grad[0] else None
        grad_w = torch._grouped_mm(grad_out.t(), x, offs=offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def expert_offsets(tokens_per_expert, num_experts: int, device: torch.device) -> torch.Tensor:
    """[E] int32 cumulative token counts on ``device`` (the ``offs`` of ``torch._grouped_mm``)."""
    if not torch.is_tensor(tokens_per_expert):
        tokens_per_expert = torch.tensor(list(tokens_per_expert), dtype=torch.int64)
    if tokens_per_expert.numel() != num_experts:
        raise ValueError(f"tokens_per_expert has {tokens_per_expert.numel()} entries for {num_experts} experts")
    offsets = torch.cumsum(tokens_per_expert.reshape(-1), dim=0).to(torch.int32)
    return offsets.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------------
# The experts module
# ----------------------------------------------------------------------------------------------------------------
_SEQUENTIAL_KEY = re.compile(r"^local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.(weight|_extra_state)$")


class GroupedGemmMLP(MegatronModule):
    """All local experts of an ``MoELayer`` as two grouped GEMMs (the ``experts`` slot of ``MoESubmodules``).

    Same constructor and forward contract as megatron's ``SequentialMLP`` / ``TEGroupedMLP``::

        forward(permuted_local_hidden_states [N, H], tokens_per_expert [E_local], permuted_probs [N])
            -> (output [N, H], None)

    Parameters: ``weight1`` [E_local, 2F/ETP, H] (fc1, SwiGLU rows ``[gate; up]`` as megatron's fc1) and ``weight2``
    [E_local, H, F/ETP] (fc2), F = ``config.moe_ffn_hidden_size``, ETP = expert-tensor-parallel size.
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        pg_collection=None,
        name: str | None = None,
        backend: GroupedGemmBackend = "auto",
    ):
        super().__init__(config=config)
        self._check_config(config)
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.backend = backend
        tp_size = get_pg_size(self.tp_group)

        input_size = config.hidden_size if config.moe_latent_size is None else config.moe_latent_size
        ffn = config.moe_ffn_hidden_size
        if ffn % tp_size:
            raise ValueError(
                f"moe_ffn_hidden_size ({ffn}) must be divisible by the expert tensor-parallel size ({tp_size})"
            )
        self.input_size = input_size
        self.ffn_per_partition = ffn // tp_size
        fc1_rows = self.ffn_per_partition * (2 if config.gated_linear_unit else 1)

        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = torch.nn.Parameter(
            torch.empty(num_local_experts, fc1_rows, input_size, device=device, dtype=config.params_dtype)
        )
        self.weight2 = torch.nn.Parameter(
            torch.empty(num_local_experts, input_size, self.ffn_per_partition, device=device, dtype=config.params_dtype)
        )
        if config.perform_initialization:
            self._initialize(config)
        # As megatron's expert linears: fc1 column-parallel (dim 0 of each expert's matrix), fc2 row-parallel.
        set_tensor_model_parallel_attributes(self.weight1, is_parallel=True, dim=1, stride=1)
        set_tensor_model_parallel_attributes(self.weight2, is_parallel=True, dim=2, stride=1)
        # allreduce=False routes the gradients through the expert-data-parallel groups (DDP, optimizer, grad norm).
        use_expert_groups = (
            config.expert_model_parallel_size > 1
            or config.expert_tensor_parallel_size != config.tensor_model_parallel_size
        )
        for param in (self.weight1, self.weight2):
            setattr(param, "allreduce", not use_expert_groups)

        # Accept SequentialMLP's per-expert keys in plain state dicts and the per-expert extra-state objects
        # that a dist-checkpoint load hands back.
        self._register_load_state_dict_pre_hook(self._stack_sequential_mlp_keys)

    # --------------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_config(config: TransformerConfig) -> None:
        if config.moe_ffn_hidden_size is None:
            raise ValueError("GroupedGemmMLP needs config.moe_ffn_hidden_size")
        if config.add_bias_linear:
            raise ValueError(
                "GroupedGemmMLP has no expert biases: set add_bias_linear=False (usual for MoE; megatron-core's "
                "experts fail with biases at EP=1 anyway)"
            )
        if config.fp8 or config.fp4:
            raise ValueError("GroupedGemmMLP computes in bf16/fp16/fp32; FP8/FP4 experts need Transformer Engine")
        if config.delay_wgrad_compute or getattr(config, "overlap_dispatch_backward_with_experts_wgrad", False):
            raise ValueError(
                "GroupedGemmMLP computes weight gradients in the ordinary backward: unset delay_wgrad_compute and "
                "overlap_dispatch_backward_with_experts_wgrad"
            )
        if getattr(config, "moe_mlp_glu_interleave_size", None) is not None:
            raise ValueError("GroupedGemmMLP keeps fc1 as [gate; up]: unset moe_mlp_glu_interleave_size")

    def _initialize(self, config: TransformerConfig) -> None:
        def init(weight, init_method):
            with torch.no_grad():
                for expert_weight in weight.unbind(0):  # per-expert matrices, as megatron's init_method expects
                    init_method(expert_weight)

        if config.use_cpu_initialization:
            init(self.weight1, config.init_method)
            init(self.weight2, config.output_layer_init_method)
        else:
            # Different experts (and EP ranks) get different weights: megatron's expert RNG stream.
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                init(self.weight1, config.init_method)
                init(self.weight2, config.output_layer_init_method)

    # --------------------------------------------------------------------------------------------------------
    def _activation(self, fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Megatron's expert activation: act(gate) * (up + glu_linear_offset), scaled by the routing prob."""
        config = self.config
        probs = probs.unsqueeze(-1)
        if (
            config.bias_activation_fusion
            and config.gated_linear_unit
            and config.activation_func is F.silu
            and config.activation_func_clamp_value is None
            and config.glu_linear_offset == 0.0
        ):
            return weighted_bias_swiglu_impl(fc1_out, None, probs, config.activation_func_fp8_input_store)
        if config.gated_linear_unit:
            gate, up = torch.chunk(fc1_out, 2, dim=-1)
            if (clamp := config.activation_func_clamp_value) is not None:
                gate = gate.clamp(min=None, max=clamp)
                up = up.clamp(min=-clamp, max=clamp)
            out = config.activation_func(gate) * (up + config.glu_linear_offset)
        else:
            out = config.activation_func(fc1_out)
        return (out * probs).to(out.dtype)

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        """Experts on tokens sorted by local expert: [N, H], [E_local] counts, [N] probs -> ([N, H], None)."""
        x = permuted_local_hidden_states
        probs = permuted_probs
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input only works with moe_router_topk=1")
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"expert input has hidden size {x.shape[-1]}, expected {self.input_size}")
        backend = self.backend
        if backend == "auto":
            backend = grouped_gemm_backend(x, self.weight1) if x.shape[0] > 0 else "loop"
        offsets = None
        if backend == "grouped_mm":
            offsets = expert_offsets(tokens_per_expert, self.num_local_experts, x.device)
        fc1_out = grouped_gemm(x, self.weight1, tokens_per_expert, offsets=offsets, backend=backend)
        act = self._activation(fc1_out, probs)
        out = grouped_gemm(act, self.weight2, tokens_per_expert, offsets=offsets, backend=backend)
        return out, None

    def backward_dw(self):
        """Weight gradients are computed in the ordinary backward (no delayed wgrad)."""

    # --------------------------------------------------------------------------------------------------------
    # Checkpoints: SequentialMLP's layout, one factory per stacked parameter.
    # --------------------------------------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The sharded tensors of megatron's ``SequentialMLP`` (``{prefix}experts.linear_fc{1,2}.weight``)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if metadata.get("singleton_local_shards", False):
            raise NotImplementedError(
                "GroupedGemmMLP: singleton_local_shards checkpoints are not supported (megatron's training "
                "checkpoints use singleton_local_shards=False)"
            )
        dp_cp_group = metadata["dp_cp_group"]
        num_global_experts = get_pg_size(self.ep_group) * self.num_local_experts
        first_expert = get_pg_rank(self.ep_group) * self.num_local_experts
        expert_axis = len(sharded_offsets)
        # SequentialMLP: experts are replicated over the expert-data-parallel group only.
        replica_id = (0, 0, get_pg_rank(self.dp_group))

        def expert_offsets_of(local_idx):
            return (*sharded_offsets, (expert_axis, first_expert + local_idx, num_global_experts))

        def per_expert_tensors(key, data, tp_axis, swiglu):
            tensors = []
            for local_idx, expert_data in enumerate(data.unbind(0)):
                offsets = expert_offsets_of(local_idx)
                sh_ten = make_tp_sharded_tensor_for_checkpoint(
                    expert_data,
                    key,
                    tp_axis,
                    replica_id=replica_id,
                    prepend_offsets=offsets,
                    tp_group=self.tp_group,
                    dp_cp_group=dp_cp_group,
                )
                if swiglu:
                    sh_ten = apply_swiglu_sharded_factory(
                        sh_ten, offsets, False, tp_group=self.tp_group, dp_group=dp_cp_group
                    ).build()
                tensors.append(sh_ten)
            return tensors

        def factory(param_name, sharded_name, tp_axis, swiglu):
            def build(key, data, build_replica_id, flattened_range):
                if flattened_range is not None:
                    raise NotImplementedError("GroupedGemmMLP: flattened optimizer states are not supported")
                return per_expert_tensors(key, data, tp_axis, swiglu)

            def merge(loaded):
                if swiglu:
                    return torch.stack([torch.cat(halves, dim=0) for halves in loaded])
                return torch.stack(loaded)

            return ShardedTensorFactory(
                f"{prefix}experts.{sharded_name}.weight",
                getattr(self, param_name),
                build,
                merge,
                replica_id=replica_id,
            )

        sharded = {
            f"{prefix}weight1": factory("weight1", "linear_fc1", 0, self.config.gated_linear_unit),
            f"{prefix}weight2": factory("weight2", "linear_fc2", 1, False),
        }
        # SequentialMLP also writes its linears' (empty) extra states; write the same objects so that it can load
        # checkpoints written here.
        for local_idx in range(self.num_local_experts):
            for linear in ("linear_fc1", "linear_fc2"):
                local_prefix = f"{prefix}local_experts.{local_idx}.{linear}."
                objects = make_sharded_tensors_for_checkpoint(
                    {"_extra_state": None},
                    local_prefix,
                    {},
                    expert_offsets_of(local_idx),
                    tp_group=self.tp_group,
                    dp_cp_group=dp_cp_group,
                )
                replace_prefix_for_sharding(objects, f"{prefix}local_experts.{local_idx}.", f"{prefix}experts.")
                for obj in objects.values():
                    obj.replica_id = (*obj.replica_id[:2], get_pg_rank(self.dp_group))
                sharded.update(objects)
        return sharded

    def _stack_sequential_mlp_keys(self, state_dict, prefix, *args, **kwargs):
        per_expert = {}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            match = _SEQUENTIAL_KEY.match(key[len(prefix) :])
            if match is None:
                continue
            value = state_dict.pop(key)
            expert, linear, kind = int(match.group(1)), match.group(2), match.group(3)
            if kind == "weight":
                per_expert.setdefault(linear, {})[expert] = value
        for linear, param_name in (("linear_fc1", "weight1"), ("linear_fc2", "weight2")):
            tensors = per_expert.get(linear)
            if not tensors:
                continue
            if sorted(tensors) != list(range(self.num_local_experts)):
                raise ValueError(
                    f"{prefix}local_experts.*.{linear}.weight: expected experts 0..{self.num_local_experts - 1}, "
                    f"got {sorted(tensors)}"
                )
            state_dict[f"{prefix}{param_name}"] = torch.stack([tensors[i] for i in range(self.num_local_experts)])


# ----------------------------------------------------------------------------------------------------------------
# Token permutation on the device (one expert-parallel rank)
# ----------------------------------------------------------------------------------------------------------------
class _GatherTokenRows(torch.autograd.Function):
    """``rows = x[row_token]`` ([N, H] from [T, H]); backward sums each token's k rows (no atomics)."""

    @staticmethod
    def forward(ctx, x, row_token, token_rows):
        ctx.save_for_backward(token_rows)
        return x.index_select(0, row_token)

    @staticmethod
    def backward(ctx, grad_rows):
        (token_rows,) = ctx.saved_tensors
        tokens, topk = token_rows.shape
        grad_x = grad_rows.index_select(0, token_rows.reshape(-1)).view(tokens, topk, -1).sum(dim=1)
        return grad_x, None, None


class _SumTokenRows(torch.autograd.Function):
    """``out[t] = sum_j rows[token_rows[t, j]]`` ([T, H] from [N, H]); backward is a gather (no atomics)."""

    @staticmethod
    def forward(ctx, rows, row_token, token_rows):
        ctx.save_for_backward(row_token)
        tokens, topk = token_rows.shape
        return rows.index_select(0, token_rows.reshape(-1)).view(tokens, topk, -1).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        (row_token,) = ctx.saved_tensors
        return grad_out.index_select(0, row_token), None, None


def sort_tokens_by_expert(routing_map: torch.Tensor, topk: int):
    """Device-only permutation metadata for a dropless top-k routing (exactly ``topk`` experts per token).

    Args:
        routing_map: [T, E] bool.
    Returns:
        row_flat: [T*topk] int64, ``expert * T + token`` of each permuted row (rows sorted by expert, then token);
        token_rows: [T, topk] int64, the permuted rows of each token;
        tokens_per_expert: [E] int64.
    No host synchronisation: every size is known from T, E and topk.
    """
    tokens, experts = routing_map.shape
    num_rows = tokens * topk
    expert_major = routing_map.t().reshape(-1)
    row_of_entry = torch.cumsum(expert_major, dim=0) - 1
    # Unselected entries all write to one spare slot, dropped afterwards.
    target = torch.where(expert_major, row_of_entry, num_rows)
    row_flat = torch.zeros(num_rows + 1, dtype=torch.int64, device=routing_map.device)
    row_flat.scatter_(0, target, torch.arange(tokens * experts, device=routing_map.device))
    row_flat = row_flat[:num_rows]
    rows_by_token = torch.where(routing_map, row_of_entry.view(experts, tokens).t(), num_rows)
    token_rows = torch.topk(rows_by_token, topk, dim=1, largest=False, sorted=True).values
    tokens_per_expert = expert_major.view(experts, tokens).sum(dim=1)
    return row_flat, token_rows, tokens_per_expert


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` (inverse ``inverse``); backward is ``grad[inverse]`` (no atomics)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def chunk_sort_permutation(chunk_sizes: torch.Tensor, num_rows: int):
    """Rows grouped as chunks (source, local expert) -> grouped as (local expert, source), on the device.

    Args:
        chunk_sizes: [S, E_local] rows per (source rank, local expert), in the order the rows arrive.
        num_rows: their total (the received tensor's length; known on the host, so no sync).
    Returns:
        perm [num_rows] (``sorted = rows[perm]``) and its inverse.
    """
    sources, experts = chunk_sizes.shape
    device = chunk_sizes.device
    sizes = chunk_sizes.reshape(-1).to(torch.int64)
    source_start = (torch.cumsum(sizes, 0) - sizes).view(sources, experts)
    sorted_sizes = chunk_sizes.t().reshape(-1).to(torch.int64)
    sorted_start = torch.cumsum(sorted_sizes, 0) - sorted_sizes
    chunk = torch.repeat_interleave(torch.arange(sources * experts, device=device), sorted_sizes, output_size=num_rows)
    rows = torch.arange(num_rows, device=device)
    perm = source_start.t().reshape(-1)[chunk] + (rows - sorted_start[chunk])
    inverse = torch.empty_like(perm).scatter_(0, perm, rows)
    return perm, inverse


def _grouped_dispatcher_class():
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    class GroupedAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
        """megatron's alltoall dispatcher; on a single expert-parallel rank the tokens are permuted on the device.

        With EP = expert-TP = 1 and dropless routing (no capacity factor, no quantization padding) there is no
        communication, and the permutation needs no host-side counts: rows are sorted by expert with a cumsum and
        one scatter, token outputs are combined with a gather and a sum over the k rows of each token (backward:
        a gather and the same sum), and ``tokens_per_expert`` stays on the device for the grouped GEMM. No host
        sync per layer, no Python loop over experts, no atomics.

        With expert (or expert-tensor) parallelism the communication is megatron's (all-to-all with host-side split
        sizes, TP all-gather / reduce-scatter), but the tokens received from the other ranks are regrouped by local
        expert with one device gather (``chunk_sort_permutation``) instead of megatron's Python loop of splits over
        every (rank, expert) chunk. Token dropping, quantization padding and TE's fused permutation stay megatron's.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            config = self.config
            self.device_permutation = (
                self.ep_size == 1
                and self.tp_size == 1
                and not self.drop_and_pad
                and config.moe_expert_capacity_factor is None
                and not config.moe_router_padding_for_quantization
                and not config.moe_permute_fusion
            )
            self.device_chunk_sort = (
                not self.device_permutation
                and self.num_local_experts > 1
                and not self.drop_and_pad
                and not config.moe_permute_fusion
            )
            self._chunk_sizes = self._chunk_perm = self._chunk_inverse = None

        def preprocess(self, routing_map):
            tokens_per_local_expert = super().preprocess(routing_map)
            if self.device_chunk_sort:
                # Still on the device here; megatron moves its own reference to the host later.
                self._chunk_sizes = self.num_global_tokens_per_local_expert.view(-1, self.num_local_experts)
            return tokens_per_local_expert

        def _split_sizes_tp(self):
            return None if self.output_splits_tp is None else self.output_splits_tp.tolist()

        def dispatch_preprocess(self, hidden_states, routing_map, probs):
            if not self.device_permutation:
                return super().dispatch_preprocess(hidden_states, routing_map, probs)
            self.hidden_shape = hidden_states.shape
            self.routing_map = routing_map
            self.probs = probs
            hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
            if self.shared_experts is not None:
                self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
            row_flat, self.token_rows, self.tokens_per_expert = sort_tokens_by_expert(
                routing_map, self.config.moe_router_topk
            )
            self.row_token = row_flat % routing_map.shape[0]
            permuted_probs = probs.t().reshape(-1)[row_flat]
            permuted = _GatherTokenRows.apply(hidden_states, self.row_token, self.token_rows)
            return permuted, permuted_probs

        def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
            if not self.device_permutation:
                return super().token_dispatch(permutated_local_input_tokens, permuted_probs)
            if self.shared_experts is not None:
                self.shared_experts.wait_current_stream()
                self.shared_experts.linear_fc1_forward_and_act(permutated_local_input_tokens)
            return permutated_local_input_tokens, permuted_probs

        def dispatch_postprocess(self, global_input_tokens, global_probs):
            if self.device_chunk_sort:
                return self._dispatch_postprocess_chunk_sort(global_input_tokens, global_probs)
            if not self.device_permutation:
                return super().dispatch_postprocess(global_input_tokens, global_probs)
            tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
            return global_input_tokens, tokens_per_expert, global_probs

        def combine_preprocess(self, hidden_states):
            if self.device_chunk_sort:
                return self._combine_preprocess_chunk_sort(hidden_states)
            if not self.device_permutation:
                return super().combine_preprocess(hidden_states)
            return hidden_states

        def _dispatch_postprocess_chunk_sort(self, tokens, probs):
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            if self.tp_size > 1:
                splits = self._split_sizes_tp()
                tokens = gather_from_sequence_parallel_region(tokens, group=self.tp_group, output_split_sizes=splits)
                probs = gather_from_sequence_parallel_region(probs, group=self.tp_group, output_split_sizes=splits)
            self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_2", self.tokens_per_expert)
            self._chunk_perm, self._chunk_inverse = chunk_sort_permutation(self._chunk_sizes, tokens.shape[0])
            tokens = _PermuteRows.apply(tokens, self._chunk_perm, self._chunk_inverse)
            probs = _PermuteRows.apply(probs, self._chunk_perm, self._chunk_inverse)
            tokens_per_expert = self._maybe_dtoh_and_synchronize("before_finish", self.tokens_per_expert)
            self.tokens_per_expert = None
            return tokens, tokens_per_expert, probs

        def _combine_preprocess_chunk_sort(self, hidden_states):
            from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region

            hidden_states = _PermuteRows.apply(hidden_states, self._chunk_inverse, self._chunk_perm)
            self._chunk_perm = self._chunk_inverse = self._chunk_sizes = None
            if self.tp_size > 1:
                # Reduce in the router's precision, as megatron does.
                hidden_states = reduce_scatter_to_sequence_parallel_region(
                    hidden_states.to(self.probs.dtype), group=self.tp_group, input_split_sizes=self._split_sizes_tp()
                ).to(hidden_states.dtype)
            return hidden_states

        def token_combine(self, hidden_states, async_finish=True, allocate_on_comm_stream=True):
            if not self.device_permutation:
                return super().token_combine(hidden_states, async_finish, allocate_on_comm_stream)
            if self.shared_experts is not None:
                self.shared_experts.wait_current_stream()
                self.shared_experts.linear_fc2_forward(hidden_states)
                self.shared_experts.post_forward_comm()
            return hidden_states

        def combine_postprocess(self, permutated_local_input_tokens):
            if not self.device_permutation:
                return super().combine_postprocess(permutated_local_input_tokens)
            output = _SumTokenRows.apply(permutated_local_input_tokens, self.row_token, self.token_rows)
            self.row_token = self.token_rows = None
            output = output.view(self.hidden_shape)
            if self.shared_experts is not None:
                output = output + self.shared_experts.get_output()
            return output

    return GroupedAlltoAllTokenDispatcher


def _grouped_moe_layer_class():
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    dispatcher_class = _grouped_dispatcher_class()

    class GroupedGemmMoELayer(MoELayer):
        """megatron's ``MoELayer`` with :class:`GroupedAlltoAllTokenDispatcher` in place of its alltoall dispatcher.

        Same submodules, parameters and checkpoints as ``MoELayer``; only the token permutation differs (see the
        dispatcher). The allgather and flex dispatchers are megatron's.
        """

        def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, is_mtp_layer=False,
                     name=None):
            if pg_collection is None:
                pg_collection = get_default_pg_collection()
            super().__init__(config, submodules, layer_number, pg_collection, is_mtp_layer, name)
            if type(self.token_dispatcher) is MoEAlltoAllTokenDispatcher:
                self.token_dispatcher = dispatcher_class(
                    self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=pg_collection
                )
                if self.use_shared_expert and self.shared_expert_overlap:
                    self.token_dispatcher.set_shared_experts(self.shared_experts)
                if hasattr(self, "_training_token_dispatcher"):  # inference-optimized layers switch back to it
                    self._training_token_dispatcher = self.token_dispatcher

    return GroupedGemmMoELayer


@functools.lru_cache(maxsize=None)
def grouped_moe_classes():
    """(GroupedGemmMoELayer, GroupedAlltoAllTokenDispatcher), built once (they subclass megatron's classes)."""
    return _grouped_moe_layer_class(), _grouped_dispatcher_class()


# ----------------------------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------------------------
ExpertsChoice = Literal["auto", "te", "grouped_gemm", "sequential"]


def get_moe_spec(
    experts: ExpertsChoice = "auto",
    *,
    grouped_gemm_backend: GroupedGemmBackend = "auto",
    device_permutation: bool = True,
):
    """The MoE ``mlp`` slot of a ``TransformerLayerSubmodules``: ``partial(MoELayer, submodules=MoESubmodules(...))``.

    Args:
        experts: ``"auto"`` = ``"te"`` when Transformer Engine is importable, else ``"grouped_gemm"``;
            ``"te"`` = megatron's TE spec (``TEGroupedMLP``, TE shared-expert linears);
            ``"grouped_gemm"`` = :class:`GroupedGemmMLP` with megatron's local linears for the shared expert;
            ``"sequential"`` = megatron's local ``SequentialMLP`` (the baseline).
        grouped_gemm_backend: passed to :class:`GroupedGemmMLP` (``"auto"``, ``"grouped_mm"``, ``"loop"``).
        device_permutation: with ``"grouped_gemm"``, use ``GroupedGemmMoELayer`` (megatron's ``MoELayer`` whose
            alltoall dispatcher permutes tokens on the device when EP = expert-TP = 1: no host sync); False keeps
            megatron's ``MoELayer`` and dispatcher unchanged.

    Router (``TopKRouter``), token dispatcher (``config.moe_token_dispatcher_type``) and shared expert
    (``config.moe_shared_expert_intermediate_size``, overlapped with ``config.moe_shared_expert_overlap``) are
    megatron's. Checkpoints are interchangeable between all three choices.
    """
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

    if experts == "auto":
        experts = "te" if te_available() else "grouped_gemm"
    if experts == "te":
        if not te_available():
            raise ValueError("get_moe_spec(experts='te') needs Transformer Engine; use 'auto' or 'grouped_gemm'")
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return get_moe_module_spec_for_backend(TESpecProvider(), num_experts=1, moe_grouped_gemm=True)
    local = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=1, moe_grouped_gemm=False)
    if experts == "sequential":
        return local
    if experts != "grouped_gemm":
        raise ValueError(f"get_moe_spec: unknown experts {experts!r}; use 'auto', 'te', 'grouped_gemm' or 'sequential'")
    submodules = local.keywords["submodules"]
    moe_layer_class = grouped_moe_classes()[0] if device_permutation else MoELayer
    return partial(
        moe_layer_class,
        submodules=MoESubmodules(
            experts=partial(GroupedGemmMLP, backend=grouped_gemm_backend),
            shared_experts=submodules.shared_experts,
            router=submodules.router,
        ),
    )
