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
installed, these experts otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
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

__all__ = [
    "GroupedGemmMLP",
    "grouped_gemm",
    "grouped_gemm_backend",
    "get_moe_spec",
    "te_available",
]

GroupedGemmBackend = Literal["auto", "grouped_mm", "loop"]


def te_available() -> bool:
    """Whether Transformer Engine is importable (then megatron's ``TEGroupedMLP`` is the better choice)."""
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


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
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([0, 4], dtype=torch.int32))
        y.backward(torch.ones_like(y))
        return bool(torch.all(y == 16)) and bool(torch.all(w.grad[0] == 0)) and bool(torch.all(w.grad[1] == 4))
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
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    if backend != "loop":
        raise ValueError(f"grouped_gemm: unknown backend {backend!r}; use 'auto', 'grouped_mm' or 'loop'")
    counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
    if len(counts) != num_experts or sum(counts) != x.shape[0]:
        raise ValueError(
            f"grouped_gemm: tokens_per_expert {counts} must have {num_experts} entries summing to {x.shape[0]}"
        )
    # unbind: one backward op stacks all expert gradients (indexing would add a full-size gradient per expert).
    return torch.cat([xe @ we.t() for xe, we in zip(torch.split(x, counts), weight.unbind(0))], dim=0)


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
# Spec
# ----------------------------------------------------------------------------------------------------------------
ExpertsChoice = Literal["auto", "te", "grouped_gemm", "sequential"]


def get_moe_spec(experts: ExpertsChoice = "auto", *, grouped_gemm_backend: GroupedGemmBackend = "auto"):
    """The MoE ``mlp`` slot of a ``TransformerLayerSubmodules``: ``partial(MoELayer, submodules=MoESubmodules(...))``.

    Args:
        experts: ``"auto"`` = ``"te"`` when Transformer Engine is importable, else ``"grouped_gemm"``;
            ``"te"`` = megatron's TE spec (``TEGroupedMLP``, TE shared-expert linears);
            ``"grouped_gemm"`` = :class:`GroupedGemmMLP` with megatron's local linears for the shared expert;
            ``"sequential"`` = megatron's local ``SequentialMLP`` (the baseline).
        grouped_gemm_backend: passed to :class:`GroupedGemmMLP` (``"auto"``, ``"grouped_mm"``, ``"loop"``).

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
    return partial(
        MoELayer,
        submodules=MoESubmodules(
            experts=partial(GroupedGemmMLP, backend=grouped_gemm_backend),
            shared_experts=submodules.shared_experts,
            router=submodules.router,
        ),
    )
