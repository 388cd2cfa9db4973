"""HSAConfig: megatron-core's TransformerConfig plus every SWA / HSA / GCA option, validated once.

Options shared by both retrieval kinds (chunk size, top-k, encoder, Gumbel noise, bypass residual, ...) carry the
``hsa_`` prefix; options that exist only for GCA carry ``gca_``; the sliding window carries ``swa_``. The model's
shape is ``layer_pattern`` (see :mod:`megatron_ext.models.pattern`). A few model-level fields (vocabulary, sequence
length, position embedding) live here too, so that one config object describes one model.

``config_from_yaml(path, **overrides)`` reads ``examples/*.yaml`` (schema in docs/design.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_ext.compat.optional import te_available
from megatron_ext.models.pattern import parse_layer_pattern

__all__ = ["HSAConfig", "config_from_yaml", "YAML_KEY_ALIASES"]

WEIGHT_RULES = ("softmax", "stick_breaking")
KERNEL_BACKENDS = ("auto", "triton", "reference")
ATTENTION_IMPLS = ("auto", "te", "sdpa", "flex")
RETRIEVAL_KINDS = frozenset({"hsa", "gca"})


def default_encoder_ffn_size(hidden_size: int) -> int:
    """The reference encoder's FFN width: floor(8/3 * hidden / 64) * 64 (at least 64)."""
    return max(64, int(8 * hidden_size / 3 / 64) * 64)


@dataclass
class HSAConfig(TransformerConfig):
    """TransformerConfig + SWA/HSA/GCA options. Invalid combinations raise ValueError naming the field and a fix."""

    # ---------------- model shape ----------------
    layer_pattern: Optional[str] = None
    """Per-layer attention kinds, e.g. 'swa*8 [hsa swa*4]*2'. None means 'full' on every layer."""

    vocab_size: Optional[int] = None
    seq_length: int = 4096
    max_position_embeddings: Optional[int] = None
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates (Megatron-LM's --rotary-percent)."""

    rotary_seq_len_interpolation_factor: Optional[float] = None
    """Linear RoPE position interpolation (Megatron-LM's --rotary-seq-len-interpolation-factor)."""

    use_rope_scaling: bool = False
    """Llama 3.x RoPE frequency scaling (Megatron-LM's --use-rope-scaling, with rope_scaling_factor)."""

    rope_scaling_factor: float = 8.0
    untie_embeddings_and_output_weights: bool = True

    # ---------------- SWA / full attention ----------------
    swa_window_size: int = 512
    """Sliding window: token i sees keys j with 0 <= i - j <= W (flash-attn's window=(W, 0))."""

    swa_alibi: bool = False
    """ALiBi biases in the causal swa/full attention (DRT's lower layers) instead of RoPE; needs
    position_embedding_type 'none' (the chunk encoder keeps its local RoPE)."""

    fused_kernel_backend: str = "auto"
    """RMSNorm and the vocabulary cross entropy (``megatron_ext.kernels.fused``): 'auto' (Triton kernels on CUDA,
    PyTorch elsewhere), 'triton' or 'reference'. The cross entropy stays Transformer Engine's when
    cross_entropy_loss_fusion with cross_entropy_fusion_impl 'te' asks for it."""

    attention_impl: str = "auto"
    """Core attention for swa/full layers: 'auto' (TE if importable, else SDPA for full and FlexAttention on CUDA /
    SDPA with a band mask on CPU for the window), 'te', 'sdpa' or 'flex'."""

    # ---------------- HSA and GCA (shared) ----------------
    hsa_chunk_size: int = 64
    hsa_topk: int = 8
    hsa_gumbel_noise: bool = False
    """Gumbel noise on the top-k ranking (training only)."""
    hsa_bypass_residual: bool = True
    """out = x + MLP(norm(x + attn(x))): the attention output enters the residual stream only through the MLP."""
    hsa_encoder_layers: int = 1
    """Bidirectional chunk-encoder layers (0 = no encoder: mean-pool landmarks, HSA only)."""
    hsa_encoder_num_query_groups: Optional[int] = None
    hsa_encoder_ffn_hidden_size: Optional[int] = None
    hsa_kernel_backend: str = "auto"
    """'auto' | 'triton' | 'reference' for megatron_ext.kernels (auto = Triton on CUDA or in the interpreter)."""

    # ---------------- HSA only ----------------
    hsa_num_kv_heads: int = 1
    """Hk: KV heads of the shared chunk memory; query heads are num_attention_heads (G = Hq / Hk)."""
    hsa_retrieval_heads: Optional[int] = None
    """R: retrieval heads, Hk (default) or 1 (one selection broadcast to every KV head)."""
    hsa_retrieval_dim: Optional[int] = None
    """Total retrieval query/landmark width, split into R heads (default: hidden_size)."""
    hsa_weight_rule: str = "softmax"
    """'softmax' over the K selected scores, or 'stick_breaking' in most-recent-first order."""
    hsa_softmax_off_by_one: bool = False
    hsa_rank_decay: bool = False
    """A learned scalar p (init 0) adds slot_rank * p to the chunk logits (recency bias by rank)."""
    hsa_landmark_norm: bool = False
    """RMSNorm on both retrieval queries and landmarks."""
    hsa_qk_norm: bool = True
    """Per-head RMSNorm on HSA queries and memory keys (and QK-norm in the chunk encoder)."""
    hsa_inner_swa: bool = False
    """An SWA sublayer inside each HSA layer, before HSA (the reference's hsa_only=False)."""
    hsa_inner_window_size: Optional[int] = None
    hsa_encoder_cls: bool = True
    """Append a learned CLS token to each chunk; its encoder output is the landmark (else mean-pool)."""

    # ---------------- GCA only ----------------
    gca_num_kv_heads: Optional[int] = None
    """KV heads of a GCA group's chunk K/V (default: num_attention_heads, i.e. MHA as in DRT)."""
    gca_softmax_off_by_one: bool = False
    gca_landmark_null_slot: bool = True
    """The landmark row of every chunk has zero K/V: a null logit 0 (DRT's effective off-by-one)."""

    # ---------------- MoE expert implementation ----------------
    moe_experts_impl: str = "auto"
    """Experts of MoE layers: 'auto' (TE if importable, else grouped GEMM), 'te', 'grouped_gemm', 'sequential'."""

    # ---------------- derived, not flags ----------------
    layer_recompute_method: Optional[str] = dataclasses.field(default=None, metadata={"derived": True})
    """Full recomputation of a retrieval model, done by its layers ('uniform' or 'block'; layers/layer_recompute.py):
    set from recompute_granularity='full', which megatron's block cannot run with the chunk memory as context."""
    layer_recompute_num_layers: Optional[int] = dataclasses.field(default=None, metadata={"derived": True})

    def __post_init__(self):
        if self.kv_channels is None and self.num_attention_heads:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        super().__post_init__()
        self._validate_hsa()
        if self.layer_pattern is not None:
            # Layers of a pattern hold different parameters (memory builder, group heads, SWA, MoE): checkpoint them
            # under per-layer keys. megatron's default stacks 'decoder.layers.*' as if layers were identical, and
            # such a checkpoint cannot be loaded (nor resharded) once they are not.
            self.hetereogenous_dist_checkpoint = True

    # ------------------------------------------------------------------------------------------------------------
    def _layer_recompute_instead_of_block(self):
        """recompute_granularity='full' of a retrieval model: each layer recomputes itself (megatron's block would
        save the chunk memory, its ``context``, as a checkpoint input, which must be a tensor); megatron's fields
        are cleared so that the block runs the layers plainly."""
        method, n = self.recompute_method, self.recompute_num_layers
        if method == "uniform" and n != 1:
            self._fail("recompute_num_layers", f"recompute_method 'uniform' with {n} layers per recomputed unit: the "
                       "layers of a model with HSA/GCA layers recompute one by one (each saves its own input)",
                       "use --recompute-num-layers 1 (every layer), or --recompute-method block with N (the first "
                       "N layers of each pipeline stage)")
        self.layer_recompute_method, self.layer_recompute_num_layers = method, n
        self.recompute_granularity = self.recompute_method = self.recompute_num_layers = None

    def _fail(self, field: str, problem: str, fix: str):
        raise ValueError(f"HSAConfig.{field}: {problem}. Fix: {fix}")

    @property
    def layer_plans(self):
        """Parsed layer pattern (one LayerPlan per layer)."""
        from megatron_ext.models.registry import ATTENTION_KINDS

        pattern = self.layer_pattern or f"full*{self.num_layers}"
        return parse_layer_pattern(pattern, frozenset(k for k, v in ATTENTION_KINDS.items() if v.retrieval))

    @property
    def retrieval_kind(self) -> Optional[str]:
        kinds = {p.kind for p in self.layer_plans} & RETRIEVAL_KINDS
        return next(iter(kinds)) if kinds else None

    @property
    def hsa_heads(self) -> int:
        return self.hsa_retrieval_heads if self.hsa_retrieval_heads is not None else self.hsa_num_kv_heads

    @property
    def hsa_retrieval_width(self) -> int:
        return self.hsa_retrieval_dim if self.hsa_retrieval_dim is not None else self.hidden_size

    @property
    def encoder_ffn_size(self) -> int:
        if self.hsa_encoder_ffn_hidden_size is not None:
            return self.hsa_encoder_ffn_hidden_size
        return default_encoder_ffn_size(self.hidden_size)

    @property
    def encoder_query_groups(self) -> int:
        return self.hsa_encoder_num_query_groups or self.num_query_groups or self.num_attention_heads

    @property
    def gca_kv_heads(self) -> int:
        return self.gca_num_kv_heads or self.num_attention_heads

    def _validate_moe_sizes(self):
        """MoE sizes that megatron would only reject while building (a bare assert / divide) or at the first
        forward (torch.topk), checked here with the field and a fix."""
        E, ep = self.num_moe_experts, self.expert_model_parallel_size
        if E % ep != 0:
            self._fail("num_moe_experts", f"{E} experts cannot be split over expert_model_parallel_size={ep}",
                       f"use a multiple of {ep} experts, e.g. {-(-E // ep) * ep}, or a divisor of {E} as EP size")
        if not 1 <= self.moe_router_topk <= E:
            self._fail("moe_router_topk", f"{self.moe_router_topk} experts per token out of {E} experts",
                       f"use a top-k of at least 1 and at most {E}")
        etp = self.expert_tensor_parallel_size or self.tensor_model_parallel_size
        ffn = self.moe_ffn_hidden_size
        if ffn is not None and ffn % etp != 0:
            self._fail("moe_ffn_hidden_size", f"the expert FFN width {ffn} is not divisible by "
                       f"expert_tensor_parallel_size={etp}", f"use a multiple of {etp}, e.g. {-(-ffn // etp) * etp}")
        shared, tp = self.moe_shared_expert_intermediate_size, self.tensor_model_parallel_size
        if shared is not None and shared % tp != 0:
            self._fail("moe_shared_expert_intermediate_size", f"the shared expert's FFN width {shared} is not "
                       f"divisible by tensor_model_parallel_size={tp}",
                       f"use a multiple of {tp}, e.g. {-(-shared // tp) * tp}")

    def _validate_hsa(self):
        from megatron_ext.models.registry import ATTENTION_KINDS  # late import: the registry imports the layers

        try:
            plans = self.layer_plans
        except ValueError as e:
            self._fail("layer_pattern", str(e), "see megatron_ext/models/pattern.py for the grammar")
        if len(plans) != self.num_layers:
            self._fail(
                "layer_pattern",
                f"{self.layer_pattern!r} has {len(plans)} layers but num_layers={self.num_layers}",
                f"set num_layers: {len(plans)} or change the pattern",
            )
        unknown = sorted({p.kind for p in plans} - set(ATTENTION_KINDS))
        if unknown:
            self._fail(
                "layer_pattern",
                f"unknown attention kind(s) {unknown}",
                f"use one of {sorted(ATTENTION_KINDS)} or register a kind with "
                f"megatron_ext.models.registry.register_attention_kind",
            )
        # Layers with different parameter sets need per-layer checkpoint keys (megatron stacks layers otherwise).
        distinct = {(p.kind, p.mlp, p.group_head, p.memory_builder) for p in plans}
        if len(distinct) > 1 or (self.num_moe_experts and self.moe_layer_freq != 1):
            self.hetereogenous_dist_checkpoint = True  # (megatron's spelling)
        kinds = {p.kind for p in plans} & RETRIEVAL_KINDS
        if len(kinds) > 1:
            self._fail("layer_pattern", "mixes hsa and gca layers (they need different chunk memories)",
                       "use one retrieval kind per model")
        if any(p.mlp == "moe" for p in plans) and not self.num_moe_experts:
            self._fail("layer_pattern", "marks a layer ':moe' but num_moe_experts is not set",
                       "set num_moe_experts (YAML: num_experts) or drop ':moe'")
        if self.num_moe_experts:
            self._validate_moe_sizes()
        if self.window_size is not None:
            # megatron's window applies to every layer; here each layer kind decides (swa: windowed, full: not).
            self._fail("window_size", f"Megatron-LM's --window-size {self.window_size} is not used by this model",
                       "drop --window-size and give the layers that slide the 'swa' kind in --layer-pattern, "
                       "with --swa-window-size W")
        if not 0.0 < self.rotary_percent <= 1.0:
            self._fail("rotary_percent", f"must be in (0, 1], got {self.rotary_percent}", "use e.g. 0.5")
        if self.swa_window_size < 1:
            self._fail("swa_window_size", f"must be >= 1, got {self.swa_window_size}", "use e.g. 512")
        if self.fused_kernel_backend not in KERNEL_BACKENDS:
            self._fail("fused_kernel_backend", f"{self.fused_kernel_backend!r} not in {KERNEL_BACKENDS}", "use 'auto'")
        if self.attention_impl not in ATTENTION_IMPLS:
            self._fail("attention_impl", f"{self.attention_impl!r} is not one of {ATTENTION_IMPLS}", "use 'auto'")
        if self.swa_alibi and self.position_embedding_type != "none":
            self._fail("swa_alibi", f"ALiBi replaces the decoder's position embedding, but position_embedding_type="
                       f"{self.position_embedding_type!r}", "set position_embedding_type: none")
        if self.swa_alibi and self.context_parallel_size > 1:
            # Our core attention has no ALiBi under CP, and Transformer Engine's (the CP path) has no ALiBi here.
            self._fail("swa_alibi", f"ALiBi attention has no context-parallel path (context_parallel_size="
                       f"{self.context_parallel_size})", "set context_parallel_size: 1 (use tensor or pipeline "
                       "parallelism for long sequences), or drop swa_alibi and use position_embedding_type: rope")
        if self.position_embedding_type not in ("rope", "none", "learned_absolute"):
            self._fail("position_embedding_type", f"{self.position_embedding_type!r} is not supported here",
                       "use 'rope' (SWA/full layers rotate, HSA is NoPE regardless)")
        if not kinds:
            return
        # ---- retrieval models ----
        S = self.hsa_chunk_size
        if S < 1:
            self._fail("hsa_chunk_size", f"must be >= 1, got {S}", "use 64 as in the papers")
        if self.seq_length % S != 0:
            self._fail("seq_length", f"{self.seq_length} is not a multiple of hsa_chunk_size={S}",
                       f"use seq_length={(self.seq_length // S + 1) * S} (or pad sequences to whole chunks)")
        if self.hsa_topk < 1:
            self._fail("hsa_topk", f"must be >= 1, got {self.hsa_topk}", "use e.g. 8 or 32")
        if self.hsa_kernel_backend not in KERNEL_BACKENDS:
            self._fail("hsa_kernel_backend", f"{self.hsa_kernel_backend!r} not in {KERNEL_BACKENDS}", "use 'auto'")
        if self.hsa_encoder_layers < 0:
            self._fail("hsa_encoder_layers", f"must be >= 0, got {self.hsa_encoder_layers}", "use 1 or 2")
        heads = self.num_attention_heads
        if heads % self.encoder_query_groups != 0:
            self._fail("hsa_encoder_num_query_groups",
                       f"{self.encoder_query_groups} does not divide num_attention_heads={heads}",
                       "pick a divisor of num_attention_heads")
        tp = self.tensor_model_parallel_size
        if self.hsa_encoder_layers > 0:
            # megatron's attention splits KV groups over TP, or replicates each over TP/groups ranks
            groups = self.encoder_query_groups
            if groups % tp != 0 and tp % groups != 0:
                fits = [g for g in range(1, heads + 1) if heads % g == 0 and (g % tp == 0 or tp % g == 0)]
                best = min(fits, key=lambda g: (abs(g - groups), g))
                self._fail("hsa_encoder_num_query_groups",
                           f"{groups} encoder KV groups cannot be split over tensor_model_parallel_size={tp}",
                           f"use a multiple or a divisor of {tp} that divides num_attention_heads={heads}, "
                           f"e.g. {best}")
            ffn = self.encoder_ffn_size
            if ffn % tp != 0:
                self._fail("hsa_encoder_ffn_hidden_size",
                           f"the encoder FFN width {ffn} is not divisible by tensor_model_parallel_size={tp}",
                           f"use a multiple of {tp}, e.g. {-(-ffn // tp) * tp}")
        cp = self.context_parallel_size
        if cp > 1 and self.seq_length % (2 * cp * S) != 0:
            self._fail("seq_length", f"{self.seq_length} cannot be split in 2*CP={2 * cp} pieces of whole "
                       f"{S}-token chunks (context parallelism never splits a chunk)",
                       f"use a multiple of {2 * cp * S}")
        if self.recompute_granularity == "full":
            self._layer_recompute_instead_of_block()
        if self.fp32_residual_connection and kinds & {"hsa", "gca"}:
            self._fail("fp32_residual_connection", "the HSA/GCA retrieval layers (chunk encoder, retrieval, "
                       "HSA/GCA projections) take the residual stream in the parameters' dtype",
                       "drop --fp32-residual-connection")
        if (self.recompute_granularity == "selective" and "layernorm" in (self.recompute_modules or ())
                and not te_available()):
            # megatron-core 0.19.2's CheckpointWithoutOutput() reads TE's FP8 state even without FP8.
            self._fail("recompute_modules", "'layernorm' recomputation needs Transformer Engine in megatron-core "
                       "0.19.2 (every layer would fail in its first forward)",
                       "drop 'layernorm' (e.g. --recompute-modules core_attn mlp) or install Transformer Engine")
        if "hsa" in kinds:
            Hk = self.hsa_num_kv_heads
            if Hk < 1 or heads % Hk != 0:
                self._fail("hsa_num_kv_heads", f"{Hk} does not divide num_attention_heads={heads}",
                           f"use a divisor; the paper's grouping is G = Hq/Hk >= 16, e.g. {max(1, heads // 16)}")
            if Hk % tp != 0 and tp % Hk != 0:
                self._fail("hsa_num_kv_heads", f"{Hk} HSA KV heads cannot be split over tensor_model_parallel_size={tp}"
                           " (with fewer KV heads than ranks, each KV head is replicated on TP/Hk ranks)",
                           f"use a multiple or a divisor of {tp} HSA KV heads")
            if self.hsa_heads not in (1, Hk):
                self._fail("hsa_retrieval_heads", f"must be 1 or hsa_num_kv_heads={Hk}, got {self.hsa_heads}",
                           f"use {Hk} (per KV head) or 1 (shared)")
            if self.hsa_retrieval_width % self.hsa_heads != 0:
                self._fail("hsa_retrieval_dim", f"{self.hsa_retrieval_width} is not divisible by "
                           f"{self.hsa_heads} retrieval heads", "use a multiple of the retrieval heads")
            if self.hsa_weight_rule not in WEIGHT_RULES:
                self._fail("hsa_weight_rule", f"{self.hsa_weight_rule!r} not in {WEIGHT_RULES}", "use 'softmax'")
            if self.hsa_encoder_cls and self.hsa_encoder_layers == 0:
                self._fail("hsa_encoder_cls", "a CLS landmark needs a chunk encoder (hsa_encoder_layers=0)",
                           "set hsa_encoder_layers >= 1 or hsa_encoder_cls: false (mean-pool landmarks)")
            if self.hsa_inner_window_size is not None and self.hsa_inner_window_size < 1:
                self._fail("hsa_inner_window_size", "must be >= 1", "use e.g. 512")
        if "gca" in kinds:
            if S < 2:
                self._fail("hsa_chunk_size", "GCA chunks hold S-1 tokens plus a landmark, so S >= 2", "use 64")
            if self.hsa_encoder_layers < 1:
                self._fail("hsa_encoder_layers", "GCA needs a chunk encoder (its landmark keys are encoder outputs)",
                           "set hsa_encoder_layers: 2 as in DRT")
            Hk = self.gca_kv_heads
            if heads % Hk != 0:
                self._fail("gca_num_kv_heads", f"{Hk} does not divide num_attention_heads={heads}", "use a divisor")
            if Hk % tp != 0:
                self._fail("gca_num_kv_heads", f"{Hk} cannot be split over tensor_model_parallel_size={tp}",
                           f"use a multiple of {tp}")


# ----------------------------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------------------------
YAML_KEY_ALIASES = {
    # Megatron-LM argument name -> HSAConfig / TransformerConfig field
    "num_experts": "num_moe_experts",
    "norm_epsilon": "layernorm_epsilon",
    "attention_pattern": "layer_pattern",
}
_SWITCHES = {
    # Megatron-LM switch -> (field, value when true)
    "disable_bias_linear": ("add_bias_linear", False),
    "add_qkv_bias": ("add_qkv_bias", True),
}
_IGNORED_SECTIONS = ("training", "data")


def _yaml_to_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(HSAConfig)}
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in _IGNORED_SECTIONS:
            continue
        if name == "swiglu":
            if value:
                fields["gated_linear_unit"] = True
                fields["activation_func"] = F.silu
            continue
        if name == "squared_relu":
            if value:
                fields["activation_func"] = lambda x: torch.pow(F.relu(x), 2)
            continue
        if name == "group_query_attention":
            continue  # implied by num_query_groups
        if name in _SWITCHES:
            field, on = _SWITCHES[name]
            fields[field] = on if value else (not on)
            continue
        name = YAML_KEY_ALIASES.get(name, name)
        if name not in names:
            raise ValueError(
                f"{where}: unknown key '{key}' (not a Megatron-LM model argument nor an HSAConfig field); "
                f"put training-only settings under a 'training:' section"
            )
        fields[name] = value
    return fields


def config_from_yaml(path: str, **overrides) -> HSAConfig:
    """Build an HSAConfig from a model YAML (examples/*.yaml); keyword overrides win over the file.

    Keys are Megatron-LM argument names in snake_case (num_layers, hidden_size, num_attention_heads,
    num_query_groups, ffn_hidden_size, seq_length, num_experts, moe_router_topk, swiglu, disable_bias_linear, ...)
    and HSAConfig field names (layer_pattern, swa_*, hsa_*, gca_*). A 'training:' section is ignored here.
    """
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of model settings, got {type(raw).__name__}")
    fields = _yaml_to_fields(raw, path)
    fields.update(_yaml_to_fields(overrides, "overrides"))
    for dtype_field in ("params_dtype", "pipeline_dtype"):
        if isinstance(fields.get(dtype_field), str):
            fields[dtype_field] = getattr(torch, fields[dtype_field])
    if fields.get("bf16") and "params_dtype" not in fields:
        fields["params_dtype"] = torch.bfloat16
    fields.setdefault("normalization", "RMSNorm")
    fields.setdefault("hidden_dropout", 0.0)
    fields.setdefault("attention_dropout", 0.0)
    return HSAConfig(**fields)

