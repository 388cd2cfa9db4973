"""Hugging Face model of the project's decoders: ``full``, ``swa``, ``hsa`` and ``gca`` layers, dense or MoE, RoPE or
ALiBi (``model_type`` "megatron_hsa_gpt"), for converted checkpoints (``tools/convert_checkpoint_to_hf.py``).

Plain PyTorch modules whose parameter names are megatron-core's (``decoder.layers.3.self_attention.linear_qkv.weight``
...), so a converted state dict loads without renaming; the math follows the spec (``docs/models.md``) and is
checked against the megatron model's logits (``tests/hf/test_hf_model.py``). HSA retrieval and chunk attention run
``megatron_ext.kernels.hsa`` (Triton on CUDA, the PyTorch reference elsewhere), RMSNorm the fused kernel: the package
must be importable where the model is loaded. Generation keeps an :class:`HSAGPTCache` (``use_cache``, on by
default in ``generate``): attention keys and values (a sliding-window layer only its window), the HSA/GCA memory of
the complete chunks and the inputs of the chunk being filled; each new token then costs one token's work, and its
HSA layers retrieve and attend as ``megatron_ext.kernels.hsa``'s decode path does (GCA layers: ``gca_decode``, with
the selection a chunk's landmark made for the next chunk).

MoE layers (megatron's ``MoELayer``: top-k router, routed experts, shared expert) run every expert on the tokens
routed to it.

GCA (DRT) models trained on data with landmark tokens (``landmark_token_id``) take text: the model inserts a
landmark after every S - 1 text tokens, as the training data had them, returns the logits of the text positions
(the landmark's -inf: it is never generated), and the cache inserts it during generation.

Not covered (the converter refuses them): MoE token dropping, group-limited routing or a gated shared
expert, RoPE scaling, interpolation or interleaving,
learned absolute positions, activations other than SiLU/GeLU, muP, no_rope_freq, gated attention output, GLU offsets
or clamps, softmax_type other than vanilla.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hsa_gpt import HSAGPTConfig

# gelu_tanh: megatron's fused bias-GeLU / GeGLU (bias_activation_fusion) compute the tanh approximation
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        from megatron_ext.kernels.fused import rms_norm

        # a decode step's few rows: the kernel's launch costs the host more than torch's few ops (steps are
        # host-bound); both compute in fp32
        few_rows = x.numel() <= 64 * x.shape[-1]
        return rms_norm(x, self.weight, self.eps, backend="reference" if few_rows else "auto")


class LayerNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def _norm(config: HSAGPTConfig, width: int) -> nn.Module:
    """The norm that ``config.normalization`` names (megatron's layer norms, QK-norms of full/swa layers)."""
    if config.normalization not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"normalization {config.normalization!r} is not supported: RMSNorm or LayerNorm")
    return (RMSNorm if config.normalization == "RMSNorm" else LayerNorm)(width, config.layernorm_epsilon)


class Linear(nn.Linear):
    """megatron's linear layers store weight [out, in] like nn.Linear."""


def rotary_angles(positions: int, dim: int, base: float, device, start: int = 0):
    """(cos, sin) [1, positions, 1, dim] of megatron's non-interleaved RoPE angles (frequencies repeated over the
    two halves) for positions start, ..., start + positions - 1; computed once per forward, used by every layer."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    steps = torch.arange(start, start + positions, device=device, dtype=torch.float32)
    freqs = torch.outer(steps, inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, angles) -> torch.Tensor:
    """x [b, s, heads, d]; the first ``dim`` dims rotate (rotate-half convention) by ``angles`` = (cos, sin) of
    :func:`rotary_angles`, the rest pass."""
    cos, sin = angles
    r = cos.shape[-1]
    rot, rest = x[..., :r].float(), x[..., r:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), rest], dim=-1)


class HSAGPTCache:
    """What generation keeps between forward calls (``past_key_values``).

    ``length``: the tokens seen so far, ``text_length`` those of them that are text (all but the landmark tokens the
    model inserts, see ``HSAGPTConfig.landmark_token_id``). ``layers[i]``: layer i's state: ``k``/``v`` [b, n, groups, d], its
    attention's keys (after RoPE) and values (a sliding-window attention keeps the last ``window`` only); for the
    layer that builds the HSA memory, ``landmarks`` [b, C, R, Dr], ``keys``/``values`` [b, C*S, Hk, d] of the complete
    chunks, and ``pending`` [b, p < S, h], its inputs of the chunk being filled.
    """

    def __init__(self):
        self.length = 0
        self.text_length = 0
        self.layers: dict[int, dict[str, torch.Tensor]] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.text_length


class SelfAttention(nn.Module):
    """megatron's SelfAttention: fused QKV laid out per query group [q heads of the group, k, v], optional QK-norm,
    RoPE, GQA; causal with an optional window (query i sees keys j with 0 <= i - j <= W) or bidirectional."""

    def __init__(self, config: HSAGPTConfig, *, num_query_groups: int, qkv_bias: bool, qk_norm: bool,
                 qk_norm_factory=None, alibi: bool = False):
        super().__init__()
        # the causal layers' ALiBi (DRT): fp32 slopes made on the first forward on a device and kept (a buffer would be
        # rounded by a cast to bf16, and left on the meta device by from_pretrained: it is not in the checkpoint)
        self.alibi = alibi
        self._slopes: dict[torch.device, torch.Tensor] = {}
        self.heads = config.num_attention_heads
        self.groups = num_query_groups
        self.head_dim = config.kv_channels
        # megatron's config.softmax_scale, else 1/sqrt(d)
        self.scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        width = self.heads * self.head_dim
        self.linear_qkv = Linear(config.hidden_size, (self.heads + 2 * self.groups) * self.head_dim, bias=qkv_bias)
        self.linear_proj = Linear(width, config.hidden_size, bias=config.add_bias_linear)
        factory = qk_norm_factory or (lambda: _norm(config, self.head_dim))
        self.q_layernorm = factory() if qk_norm else None
        self.k_layernorm = factory() if qk_norm else None

    def forward(self, x, angles: Optional[tuple], *, causal: bool, window: Optional[int],
                state: Optional[dict] = None, valid: Optional[int] = None):
        """``state``: this layer's entry of an :class:`HSAGPTCache`. Without keys in it, x is the prompt (its first
        ``valid`` rows real, the rest padding) and the keys and values are kept; with keys, x is one new token,
        which attends to them and itself."""
        b, s, _ = x.shape
        per_group = self.heads // self.groups
        qkv = self.linear_qkv(x).view(b, s, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(b, s, self.heads, self.head_dim)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if angles is not None:
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        decoding = state is not None and "k" in state
        if state is not None:
            k_all = torch.cat([state["k"], k], dim=1) if decoding else k[:, :valid]
            v_all = torch.cat([state["v"], v], dim=1) if decoding else v[:, :valid]
            keep = k_all.shape[1] if window is None else min(window, k_all.shape[1])
            state["k"], state["v"] = k_all[:, k_all.shape[1] - keep:], v_all[:, v_all.shape[1] - keep:]
            if decoding:  # the window's W past keys and the token's own: all of them, no mask
                k, v, causal = k_all, v_all, False
        # query head n belongs to KV group n // per_group
        k, v = (t.repeat_interleave(per_group, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        slopes = self._alibi_slopes(q.device) if self.alibi else None
        band = window if window is not None and window < s - 1 else None  # a window past the sequence: causal
        if decoding and slopes is not None:  # the new token is the last key: ALiBi by distance from it
            distance = torch.arange(k.shape[2], device=q.device) - (k.shape[2] - 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=(slopes[:, None, None] * distance).to(q.dtype),
                                               scale=self.scale)
        elif causal and (band is not None or slopes is not None):
            o = banded_attention(q, k, v, band, self.scale, slopes=slopes)
        else:  # plain causal without an [s, s] mask: SDPA's fused kernels
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale)
        return self.linear_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def _alibi_slopes(self, device):
        if device not in self._slopes:  # once: a host-to-device copy in every decode step would stall the host
            from megatron_ext.kernels.alibi import alibi_slopes

            self._slopes[device] = alibi_slopes(self.heads).to(device)
        return self._slopes[device]


BAND_BLOCK = 1024  # query rows per step of banded_attention (at least the window)


def banded_attention(q, k, v, window: Optional[int], scale: float, block: Optional[int] = None,
                     slopes: Optional[torch.Tensor] = None):
    """Causal attention of q [b, h, s, d] where query i sees keys j with 0 <= i - j <= window (all j <= i without
    a window), a block of queries at a time against the keys its band reaches: memory and work grow as
    s * (block + window), not s^2 (a 64K-token prompt's [s, s] mask alone would be 4 GiB). ``slopes`` [h]: ALiBi,
    slope_h * (j - i) added to the logits."""
    s = q.shape[2]
    block = max(block or BAND_BLOCK, window or 0)
    out = torch.empty_like(q)
    for start in range(0, s, block):
        end = min(start + block, s)
        first = 0 if window is None else max(0, start - window)
        i = torch.arange(start, end, device=q.device)[:, None]
        j = torch.arange(first, end, device=q.device)[None, :]
        mask = (j <= i) if window is None else (j <= i) & (i - j <= window)
        if slopes is not None:  # a float mask: the bias where attending, -inf elsewhere
            mask = (slopes[:, None, None] * (j - i).float()).masked_fill(~mask, float("-inf")).to(q.dtype)
        out[:, :, start:end] = F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, first:end], v[:, :, first:end], attn_mask=mask, scale=scale)
    return out


class MLP(nn.Module):
    """megatron's MLP: linear_fc1 (gate and up halves concatenated with a gated unit), activation, linear_fc2."""

    def __init__(self, config: HSAGPTConfig, ffn: int, *, gated: bool, activation: str):
        super().__init__()
        self.gated = gated
        self.act = ACTIVATIONS[activation]
        self.linear_fc1 = Linear(config.hidden_size, ffn * (2 if gated else 1), bias=config.add_bias_linear)
        self.linear_fc2 = Linear(ffn, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x):
        return self.linear_fc2(_activate(self.linear_fc1(x), self.gated, self.act))


def _activate(h, gated: bool, act):
    """The MLP's activation of fc1's output: act(gate) * up of the [gate; up] halves with a gated unit."""
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


class Router(nn.Module):
    """megatron's ``TopKRouter`` at inference: logits = x W^T (in fp32 with ``moe_router_dtype`` "fp32"), then top-k
    of the logits and a softmax over them (or softmax first with ``moe_router_pre_softmax``), or sigmoid scores,
    chosen with ``expert_bias`` added and normalised over the k; times ``moe_router_topk_scaling_factor``."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_moe_experts, config.hidden_size))
        if config.moe_router_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_moe_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        # The expert bias stays fp32 through `.to(dtype)` / `.half()`, as megatron keeps it: learned biases differ
        # by less than a bf16 ulp near 1, and rounding them would choose other experts than the trained model.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None:
            self.expert_bias = bias.to(device=self.expert_bias.device, dtype=torch.float32)
        return self

    def forward(self, x):  # [N, h] -> probabilities [N, k] (x's dtype), expert indices [N, k]
        c = self.config
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(c.moe_router_dtype, x.dtype)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))
        k = c.moe_router_topk
        if c.moe_router_score_function == "softmax":
            if c.moe_router_pre_softmax:
                probs, experts = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(k, dim=-1)
            else:
                top, experts = logits.topk(k, dim=-1)
                probs = torch.softmax(top, dim=-1, dtype=torch.float32)
        else:  # sigmoid
            scores = torch.sigmoid(logits.float())
            ranked = scores if self.expert_bias is None else scores + self.expert_bias.float()
            experts = ranked.topk(k, dim=-1).indices
            probs = scores.gather(1, experts)
            if k > 1:
                probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        if c.moe_router_topk_scaling_factor:
            probs = probs * c.moe_router_topk_scaling_factor
        return probs.to(logits.dtype).to(x.dtype), experts


class Experts(nn.Module):
    """The routed experts as stacked weights (megatron_ext's grouped-GEMM experts): ``weight1`` [E, 2F or F, h]
    (fc1; a gated unit's rows are [gate; up]) and ``weight2`` [E, h, F] (fc2)."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__()
        E, F_, h = config.num_moe_experts, config.moe_ffn_hidden_size, config.hidden_size
        self.gated = config.gated_linear_unit
        self.act = ACTIVATIONS[config.activation]
        self.weight1 = nn.Parameter(torch.empty(E, F_ * (2 if self.gated else 1), h))
        self.weight2 = nn.Parameter(torch.empty(E, h, F_))

    def forward(self, x, expert: int):
        return F.linear(_activate(F.linear(x, self.weight1[expert]), self.gated, self.act), self.weight2[expert])


class MoE(nn.Module):
    """megatron's ``MoELayer`` without token dropping: sum over a token's k experts of prob * expert(x), plus the
    shared expert when there is one."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)
        shared = config.moe_shared_expert_intermediate_size
        self.shared_experts = (MLP(config, shared, gated=config.gated_linear_unit, activation=config.activation)
                               if shared else None)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        probs, experts = self.router(tokens)
        out = torch.zeros_like(tokens)
        for expert in experts.unique().tolist():
            rows, slot = (experts == expert).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts(tokens[rows], expert) * probs[rows, slot, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return out.view_as(x)


def _causal_self_attention(config: HSAGPTConfig) -> SelfAttention:
    """The decoder's causal attention (full, swa, and the inner SWA of retrieval layers)."""
    return SelfAttention(config, num_query_groups=config.num_query_groups,
                         qkv_bias=config.add_qkv_bias or config.add_bias_linear, qk_norm=config.qk_layernorm,
                         alibi=config.swa_alibi)


def _mlp(config: HSAGPTConfig, layer_index: int) -> nn.Module:
    if layer_index in (config.moe_layers or ()):
        return MoE(config)
    return MLP(config, config.ffn_hidden_size, gated=config.gated_linear_unit, activation=config.activation)


class DecoderLayer(nn.Module):
    """A pre-norm transformer layer: x + attn(norm x), then + mlp(norm x) (``full`` and ``swa``)."""

    def __init__(self, config: HSAGPTConfig, window: Optional[int], layer_index: int):
        super().__init__()
        self.window = window
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attention = _causal_self_attention(config)
        self.pre_mlp_layernorm = _norm(config, config.hidden_size)
        self.mlp = _mlp(config, layer_index)

    def forward(self, x, angles, memory=None, state=None, step=None):
        x = x + self.self_attention(self.input_layernorm(x), angles, causal=True, window=self.window, state=state,
                                    valid=step.valid if step else None)
        return x + self.mlp(self.pre_mlp_layernorm(x)), memory


class ChunkEncoder(nn.Module):
    """Bidirectional encoder of every chunk on its own: Qwen2-style layers (q/k/v bias, QK-norm with hsa_qk_norm,
    SwiGLU of the encoder width), RoPE at positions local to the chunk, then a final RMSNorm."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__()
        ffn = config.hsa_encoder_ffn_hidden_size or max(64, int(8 * config.hidden_size / 3 / 64) * 64)
        eps = config.layernorm_epsilon
        # the encoder's QK-norm is the model's norm where the model has QK-norm, else an RMSNorm
        qk_factory = None if config.qk_layernorm else (lambda: RMSNorm(config.kv_channels, eps))
        self.layers = nn.ModuleList()
        for _ in range(config.hsa_encoder_layers):
            layer = nn.Module()
            layer.input_layernorm = _norm(config, config.hidden_size)
            layer.self_attention = SelfAttention(config, num_query_groups=config.hsa_encoder_num_query_groups,
                                                 qkv_bias=True, qk_norm=config.hsa_qk_norm,
                                                 qk_norm_factory=qk_factory)
            layer.pre_mlp_layernorm = _norm(config, config.hidden_size)
            layer.mlp = MLP(config, ffn, gated=True, activation="silu")
            self.layers.append(layer)
        self.final_norm = RMSNorm(config.hidden_size, eps)
        self.rotary_base = config.rotary_base
        self.head_dim = config.kv_channels

    def forward(self, chunks):  # [b*C, S', h]
        angles = rotary_angles(chunks.shape[1], self.head_dim, self.rotary_base, chunks.device)
        y = chunks
        for layer in self.layers:
            y = y + layer.self_attention(layer.input_layernorm(y), angles, causal=False, window=None)
            y = y + layer.mlp(layer.pre_mlp_layernorm(y))
        return self.final_norm(y)


class HSAChunkMemory(nn.Module):
    """Landmarks [b, C, R, Dr] and the shared memory K/V [b, C*S, Hk, D] of the residual stream x [b, s, h]."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.chunk_size = config.hsa_chunk_size
        self.retrieval_heads = config.hsa_retrieval_heads
        self.kv_heads = config.hsa_num_kv_heads
        self.head_dim = config.kv_channels
        self.encoder = ChunkEncoder(config) if config.hsa_encoder_layers else None
        self.input_norm = None if self.encoder is not None else RMSNorm(h, eps)
        self.use_cls = bool(config.hsa_encoder_cls and self.encoder is not None)
        if self.use_cls:
            self.cls_token = nn.Parameter(torch.zeros(h))
        self.landmark_proj = Linear(h, config.hsa_retrieval_dim, bias=False)
        self.key_proj = Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.value_proj = Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.key_norm = RMSNorm(self.head_dim, eps) if config.hsa_qk_norm else None

    def forward(self, x):
        b, s, h = x.shape
        S = self.chunk_size
        C = s // S
        chunks = x.reshape(b * C, S, h)
        if self.encoder is not None:
            if self.use_cls:  # a learned CLS token closes every chunk; its output is the chunk's summary
                chunks = torch.cat([chunks, self.cls_token.to(chunks.dtype).expand(b * C, 1, h)], dim=1)
            encoded = self.encoder(chunks)
            if self.use_cls:
                summary, encoded = encoded[:, -1], encoded[:, :-1]
            else:
                summary = encoded.mean(dim=1)
        else:
            encoded = self.input_norm(chunks)
            summary = encoded.mean(dim=1)
        landmarks = self.landmark_proj(summary).reshape(b, C, self.retrieval_heads, -1)
        tokens = encoded.reshape(b, C * S, h)
        keys = self.key_proj(tokens).reshape(b, C * S, self.kv_heads, self.head_dim)
        values = self.value_proj(tokens).reshape(b, C * S, self.kv_heads, self.head_dim)
        if self.key_norm is not None:
            keys = self.key_norm(keys)
        return landmarks, keys, values

    def cached(self, x, state: dict, valid: int):
        """The memory through an :class:`HSAGPTCache` entry. Prompt (``pending`` not in ``state`` yet): the memory
        of all of x, whose complete chunks (of the first ``valid`` rows) are kept, and the rest of the real rows
        wait in ``pending``. One new token: it joins ``pending``, which becomes a chunk of the memory once full."""
        S = self.chunk_size
        if "pending" not in state:
            landmarks, keys, values = self(x)
            complete = valid // S
            state.update(landmarks=landmarks[:, :complete], keys=keys[:, :complete * S],
                         values=values[:, :complete * S], pending=x[:, complete * S:valid])
            return landmarks, keys, values
        pending = torch.cat([state["pending"], x], dim=1)
        if pending.shape[1] == S:
            for name, part in zip(("landmarks", "keys", "values"), self(pending)):
                state[name] = torch.cat([state[name], part], dim=1)
            pending = pending[:, :0]
        state["pending"] = pending
        return state["landmarks"], state["keys"], state["values"]


class HSARetrieval(nn.Module):
    """Each token's top-k past chunks and their weights: q_r = W_r RMSNorm(x) against the landmarks."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.config = config
        self.norm = RMSNorm(h, eps)
        self.query_proj = Linear(h, config.hsa_retrieval_dim, bias=False)
        head_dim = config.hsa_retrieval_dim // config.hsa_retrieval_heads
        self.query_norm = RMSNorm(head_dim, eps) if config.hsa_landmark_norm else None
        self.landmark_norm = RMSNorm(head_dim, eps) if config.hsa_landmark_norm else None
        self.rank_decay = nn.Parameter(torch.zeros(1)) if config.hsa_rank_decay else None

    def forward(self, x, landmarks, position: Optional[int] = None):
        """x: the layer inputs of a whole sequence, or (``position`` given) of the one new token at that position,
        whose landmarks are those of the complete chunks so far."""
        from megatron_ext.kernels.hsa import hsa_retrieval
        from megatron_ext.kernels.hsa.reference import decode_retrieval

        c = self.config
        b, s, _ = x.shape
        q_r = self.query_proj(self.norm(x)).reshape(b, s, c.hsa_retrieval_heads, -1)
        if self.query_norm is not None:
            q_r, landmarks = self.query_norm(q_r), self.landmark_norm(landmarks)
        rank_decay = self.rank_decay[0] if self.rank_decay is not None else None
        if position is not None and landmarks.shape[1] == 0:  # no complete chunk yet: every slot empty
            indices = torch.full((b, 1, c.hsa_retrieval_heads, c.hsa_topk), -1, dtype=torch.long, device=x.device)
            weights = torch.zeros(indices.shape, dtype=torch.float32, device=x.device)
        elif position is not None:  # one query against a few landmarks: the reference is the decode path
            indices, weights = decode_retrieval(
                q_r[:, 0], landmarks.to(q_r.dtype), torch.full((b,), position, device=x.device),
                chunk_size=c.hsa_chunk_size, topk=c.hsa_topk, weight_rule=c.hsa_weight_rule, rank_decay=rank_decay)
            indices, weights = indices[:, None], weights[:, None]
        else:
            indices, weights = hsa_retrieval(
                q_r.contiguous(), landmarks.to(q_r.dtype).contiguous(), chunk_size=c.hsa_chunk_size,
                topk=c.hsa_topk, weight_rule=c.hsa_weight_rule, gumbel=False, rank_decay=rank_decay,
                backend=c.hsa_kernel_backend,
            )
        if c.hsa_retrieval_heads == 1:  # one selection shared by every KV head
            indices = indices.expand(-1, -1, c.hsa_num_kv_heads, -1)
            weights = weights.expand(-1, -1, c.hsa_num_kv_heads, -1)
        return indices.contiguous(), weights.contiguous()


class HSAAttention(nn.Module):
    """q = W_q x (per-head RMSNorm with hsa_qk_norm, no RoPE) attends to each selected chunk of the shared memory;
    the per-chunk outputs are summed with the retrieval weights; then W_o."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__()
        self.config = config
        width = config.num_attention_heads * config.kv_channels
        self.query_proj = Linear(config.hidden_size, width, bias=False)
        self.query_norm = RMSNorm(config.kv_channels, config.layernorm_epsilon) if config.hsa_qk_norm else None
        self.output_proj = Linear(width, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x, keys, values, indices, weights):
        from megatron_ext.kernels.hsa import hsa_attention

        c = self.config
        b, s, _ = x.shape
        q = self.query_proj(x).reshape(b, s, c.num_attention_heads, c.kv_channels)
        if self.query_norm is not None:
            q = self.query_norm(q)
        o = hsa_attention(q.contiguous(), keys.to(q.dtype).contiguous(), values.to(q.dtype).contiguous(), weights,
                          indices, chunk_size=c.hsa_chunk_size, softmax_off_by_one=c.hsa_softmax_off_by_one,
                          backend=c.hsa_kernel_backend)
        return self.output_proj(o.reshape(b, s, -1))


class _RetrievalLayer(nn.Module):
    """What the HSA and GCA layers share: the model's first one builds the chunk memory and each group's first one
    retrieves, both from the layer's input; an inner SWA (when ``window``) runs first; with the bypass residual the
    retrieval output reaches the residual stream only through the MLP: out = x + MLP(norm(x + A(norm x)))."""

    kind: str
    memory_fields: tuple[str, ...]

    def __init__(self, config: HSAGPTConfig, layer_index: int, *, memory: Optional[nn.Module],
                 retrieval: Optional[nn.Module], attention: nn.Module, window: Optional[int]):
        super().__init__()
        self.config = config
        self.chunk_memory = memory
        self.retrieval = retrieval
        self.window = window
        if window is not None:
            self.input_layernorm = _norm(config, config.hidden_size)
            self.self_attention = _causal_self_attention(config)
        self.pre_cross_attn_layernorm = _norm(config, config.hidden_size)
        self.cross_attention = attention
        self.pre_mlp_layernorm = _norm(config, config.hidden_size)
        self.mlp = _mlp(config, layer_index)

    def forward(self, x, angles, memory, state=None, step=None):
        if self.chunk_memory is not None:
            built = self.chunk_memory(x) if state is None else self.chunk_memory.cached(x, state, step.valid)
            memory = dict(zip(self.memory_fields, built))
        if self.retrieval is not None:
            memory = {**memory, **self._retrieve(x, memory, state, step)}
        if memory is None or "indices" not in memory:
            raise RuntimeError(f"a {self.kind} layer got no chunk memory or selection from the layers below")
        if self.window is not None:
            x = x + self.self_attention(self.input_layernorm(x), angles, causal=True, window=self.window,
                                        state=state, valid=step.valid if step else None)
        a = self.cross_attention(self.pre_cross_attn_layernorm(x), memory["keys"], memory["values"],
                                 memory["indices"], memory["weights"], **self._attention_options(step))
        if self.config.hsa_bypass_residual:
            return x + self.mlp(self.pre_mlp_layernorm(x + a)), memory
        x = x + a
        return x + self.mlp(self.pre_mlp_layernorm(x)), memory

    def _attention_options(self, step) -> dict:
        return {}


class HSALayer(_RetrievalLayer):
    """The HSA layer: a shared memory (landmarks, K/V) and a per-token selection; the inner SWA is optional."""

    kind = "HSA"
    memory_fields = ("landmarks", "keys", "values")

    def __init__(self, config: HSAGPTConfig, layer_index: int, *, builds_memory: bool, retrieves: bool):
        window = (config.hsa_inner_window_size or config.swa_window_size) if config.hsa_inner_swa else None
        super().__init__(config, layer_index, memory=HSAChunkMemory(config) if builds_memory else None,
                         retrieval=HSARetrieval(config) if retrieves else None, attention=HSAAttention(config),
                         window=window)

    def _retrieve(self, x, memory, state, step):
        indices, weights = self.retrieval(x, memory["landmarks"],
                                          position=step.position if step and step.decoding else None)
        return dict(indices=indices, weights=weights)


class GCAChunkMemory(nn.Module):
    """DRT's chunk memory of the residual stream x [b, s, h]: RMSNorm, the chunk encoder; the encoder output at each
    chunk's last row (its landmark token) is the chunk's landmark [b, C, h], all rows the encoded chunks
    [b, C*S, h] from which each GCA group projects its K/V."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__()
        self.chunk_size = config.hsa_chunk_size
        self.input_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.encoder = ChunkEncoder(config)

    def forward(self, x):
        b, s, h = x.shape
        S = self.chunk_size
        encoded = self.encoder(self.input_norm(x).reshape(b * (s // S), S, h))
        return encoded[:, -1].reshape(b, s // S, h), encoded.reshape(b, s, h)

    def cached(self, x, state: dict, valid: int):
        """As :meth:`HSAChunkMemory.cached`: the prompt's complete chunks are kept, a new token waits in
        ``pending`` until its chunk is complete."""
        S = self.chunk_size
        if "pending" not in state:
            landmarks, encoded = self(x)
            complete = valid // S
            state.update(landmarks=landmarks[:, :complete], encoded=encoded[:, :complete * S],
                         pending=x[:, complete * S:valid])
            return landmarks, encoded
        pending = torch.cat([state["pending"], x], dim=1)
        if pending.shape[1] == S:
            for name, part in zip(("landmarks", "encoded"), self(pending)):
                state[name] = torch.cat([state[name], part], dim=1)
            pending = pending[:, :0]
        state["pending"] = pending
        return state["landmarks"], state["encoded"]


class GCARetrieval(nn.Module):
    """A GCA group's selection and chunk K/V: the query of chunk c is RMSNorm(x at c's landmark row) against the
    landmarks of chunks e < c; that selection serves the tokens of chunk c + 1. K/V = W_k, W_v of the encoded
    chunks (gca_kv_heads heads)."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.landmark_query_norm = RMSNorm(h, config.layernorm_epsilon)
        self.key_proj = Linear(h, config.gca_kv_heads * config.kv_channels, bias=False)
        self.value_proj = Linear(h, config.gca_kv_heads * config.kv_channels, bias=False)

    def _kv(self, encoded):
        b, n, _ = encoded.shape
        c = self.config
        return (self.key_proj(encoded).reshape(b, n, c.gca_kv_heads, c.kv_channels),
                self.value_proj(encoded).reshape(b, n, c.gca_kv_heads, c.kv_channels))

    def forward(self, x, landmarks, encoded):
        """x [b, C*S, h], the layer's input of whole chunks -> (indices, weights) [b, C, K] per query chunk, K/V."""
        from megatron_ext.kernels.gca import gca_retrieval, selection_for_query_chunks

        S = self.config.hsa_chunk_size
        query = self.landmark_query_norm(x[:, S - 1::S])
        made_by = gca_retrieval(query, landmarks.to(query.dtype), topk=self.config.hsa_topk, chunk_size=S)
        return (*selection_for_query_chunks(*made_by), *self._kv(encoded)), made_by

    def cached(self, x, landmarks, encoded, state: dict, step: "_Step"):
        """Through an :class:`HSAGPTCache` entry: the K/V of the complete chunks and ``next`` (indices, weights
        [b, K]), the selection serving the chunk being filled. A decode step that completes chunk c (x is its
        landmark token) attends with the selection it had, then retrieves for chunk c + 1."""
        from megatron_ext.kernels.gca import gca_decode_retrieval

        S = self.config.hsa_chunk_size
        if not step.decoding:
            (indices, weights, keys, values), (made_idx, made_w) = self(x, landmarks, encoded)
            complete = step.valid // S
            state.update(keys=keys[:, :complete * S], values=values[:, :complete * S])
            state["next"] = ((made_idx[:, complete - 1], made_w[:, complete - 1]) if complete
                             else self._empty(x))
            return indices, weights, keys, values
        indices, weights = state["next"]
        c = landmarks.shape[1]
        if state["keys"].shape[1] < c * S:  # this token completed chunk c - 1
            keys, values = self._kv(encoded[:, (c - 1) * S:])
            state["keys"] = torch.cat([state["keys"], keys], dim=1)
            state["values"] = torch.cat([state["values"], values], dim=1)
            state["next"] = gca_decode_retrieval(self.landmark_query_norm(x[:, -1]),
                                                 landmarks[:, :c - 1].to(x.dtype), topk=self.config.hsa_topk)
        return indices, weights, state["keys"], state["values"]

    def _empty(self, x):
        shape = (x.shape[0], self.config.hsa_topk)
        return (torch.full(shape, -1, dtype=torch.int32, device=x.device),
                torch.zeros(shape, dtype=torch.float32, device=x.device))


class GCAAttention(nn.Module):
    """q = W_q x; every token of query chunk c attends to each chunk selected for c with its own softmax (the
    landmark row a zero K/V slot with gca_landmark_null_slot); the outputs summed with the weights; then W_o."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__()
        self.config = config
        width = config.num_attention_heads * config.kv_channels
        self.query_proj = Linear(config.hidden_size, width, bias=False)
        self.output_proj = Linear(width, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x, keys, values, indices, weights, decoding: bool = False):
        from megatron_ext.kernels.gca import gca_attention, gca_decode

        c = self.config
        b, s, _ = x.shape
        q = self.query_proj(x).reshape(b, s, c.num_attention_heads, c.kv_channels)
        options = dict(chunk_size=c.hsa_chunk_size, softmax_off_by_one=c.gca_softmax_off_by_one,
                       landmark_null_slot=c.gca_landmark_null_slot, backend=c.hsa_kernel_backend)
        attend = gca_decode if decoding else gca_attention
        o = attend(q.contiguous(), keys.to(q.dtype).contiguous(), values.to(q.dtype).contiguous(), weights,
                   indices, **options)
        return self.output_proj(o.reshape(b, s, -1))


class GCALayer(_RetrievalLayer):
    """The GCA layer (DRT's upper layers): always an inner SWA; each group projects its own chunk K/V and makes one
    selection per chunk, which serves the next chunk."""

    kind = "GCA"
    memory_fields = ("landmarks", "encoded")

    def __init__(self, config: HSAGPTConfig, layer_index: int, *, builds_memory: bool, retrieves: bool):
        super().__init__(config, layer_index, memory=GCAChunkMemory(config) if builds_memory else None,
                         retrieval=GCARetrieval(config) if retrieves else None, attention=GCAAttention(config),
                         window=config.swa_window_size)

    def _retrieve(self, x, memory, state, step):
        if state is None:
            selected, _ = self.retrieval(x, memory["landmarks"], memory["encoded"])
        else:
            selected = self.retrieval.cached(x, memory["landmarks"], memory["encoded"],
                                             state.setdefault("retrieval", {}), step)
        return dict(zip(("indices", "weights", "keys", "values"), selected))

    def _attention_options(self, step) -> dict:
        return dict(decoding=bool(step and step.decoding))


class Decoder(nn.Module):
    def __init__(self, config: HSAGPTConfig):
        from megatron_ext.models.pattern import parse_layer_pattern

        super().__init__()
        plans = parse_layer_pattern(config.layer_pattern, frozenset({"hsa", "gca"}))
        if len(plans) != config.num_layers:
            raise ValueError(f"layer_pattern {config.layer_pattern!r} has {len(plans)} layers, num_layers is "
                             f"{config.num_layers}")
        layers = []
        for plan in plans:
            if plan.kind == "full":
                layers.append(DecoderLayer(config, None, plan.index))
            elif plan.kind == "swa":
                layers.append(DecoderLayer(config, config.swa_window_size, plan.index))
            elif plan.kind in ("hsa", "gca"):
                layer = HSALayer if plan.kind == "hsa" else GCALayer
                layers.append(layer(config, plan.index, builds_memory=plan.memory_builder, retrieves=plan.group_head))
            else:
                raise ValueError(f"layer kind {plan.kind!r} (layer {plan.index}) has no Hugging Face implementation "
                                 f"here: full, swa, hsa and gca layers are supported")
        self.layers = nn.ModuleList(layers)
        self.chunked = any(plan.kind in ("hsa", "gca") for plan in plans)
        self.final_layernorm = _norm(config, config.hidden_size)

    def forward(self, x, angles, cache: Optional[HSAGPTCache] = None, step: Optional["_Step"] = None):
        memory = None
        for i, layer in enumerate(self.layers):
            state = None if cache is None else cache.layers.setdefault(i, {})
            x, memory = layer(x, angles, memory, state, step)
        return self.final_layernorm(x)


@dataclass
class _Step:
    """One forward call with a cache: the prompt (its first ``valid`` rows real) or the one token at ``position``."""
    position: int
    valid: int
    decoding: bool


class HSAGPTPreTrainedModel(PreTrainedModel):
    config_class = HSAGPTConfig
    base_model_prefix = "decoder"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer", "HSALayer", "GCALayer"]

    def _init_weights(self, module):
        # converted checkpoints set every weight; fresh models start like megatron's (normal(0, 0.02))
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, (Router, Experts)):
            for param in module.parameters(recurse=False):
                nn.init.normal_(param, std=0.02)


class HSAGPTForCausalLM(HSAGPTPreTrainedModel, GenerationMixin):
    """Embedding -> decoder layers of ``config.layer_pattern`` -> final norm -> logits (the output layer shares
    the embedding's weight when ``tie_word_embeddings``). Positions are 0..s-1 of each sequence (RoPE). Right
    padding (``attention_mask``) is accepted without a cache, for scoring batches of unequal lengths; generation
    needs prompts of equal length."""

    def __init__(self, config: HSAGPTConfig):
        super().__init__(config)
        if config.position_embedding_type not in ("rope", "none"):
            raise ValueError(f"position_embedding_type {config.position_embedding_type!r}: rope or none")
        self.embedding = nn.Module()
        self.embedding.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.decoder = Decoder(config)
        self.output_layer = (None if config.tie_word_embeddings
                             else Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.output_layer

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, past_key_values: Optional[HSAGPTCache] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, **kwargs):
        """Logits of ``input_ids``. With ``use_cache`` (or a ``past_key_values`` cache) the returned
        ``past_key_values`` holds what the next call needs: given a cache that has seen n tokens, ``input_ids`` are
        the tokens after them, run one at a time. ``logits_to_keep`` N > 0: logits of the last N positions only
        (``generate`` asks for 1; a long prompt's [L, vocab] logits would not fit)."""
        landmark = self.config.landmark_token_id
        if landmark is not None and bool((input_ids == landmark).any()):
            raise ValueError(f"input_ids hold the landmark token {landmark}: pass text only, the model inserts a "
                             f"landmark after every {self.config.hsa_chunk_size - 1} text tokens itself")
        cache = past_key_values
        if attention_mask is not None and not bool(attention_mask.all()):
            # Right padding (each row's real tokens first) leaves the real tokens' logits exact: every layer is
            # causal and HSA/GCA retrieve only complete chunks before a token's own. Left padding would move every
            # chunk boundary, and a cache would grow each row from a different position.
            mask = attention_mask.bool()
            if not bool((mask[:, 1:] <= mask[:, :-1]).all()) or cache is not None or use_cache:
                raise ValueError("attention_mask: only right padding (each row's real tokens first) without a cache, "
                                 "as for scoring; its padded positions' logits are meaningless. Generate from "
                                 "batches of prompts of equal length (or one at a time)")
        if cache is not None and not isinstance(cache, HSAGPTCache):
            raise TypeError(f"past_key_values must be the HSAGPTCache this model returned, got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = HSAGPTCache()
        if cache is not None and cache.length:
            h = torch.cat([self._decode(input_ids[:, j:j + 1], cache) for j in range(input_ids.shape[1])], dim=1)
        else:
            h = self._prompt(input_ids, cache)
        weight = self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep and labels: the loss needs the logits of every position")
        logits = F.linear(h[:, -logits_to_keep:] if logits_to_keep else h, weight)
        if landmark is not None and landmark < logits.shape[-1]:  # never a text token: never generated
            logits = logits.index_fill(-1, torch.tensor([landmark], device=logits.device), float("-inf"))
        loss = None
        if labels is not None:  # Hugging Face convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def _angles(self, positions: int, device, start: int = 0):
        c = self.config
        if c.position_embedding_type != "rope":
            return None
        return rotary_angles(positions, int(c.kv_channels * c.rotary_percent), c.rotary_base, device, start)

    def _with_landmarks(self, input_ids):
        """Text ids [b, n] -> the model's ids with a landmark after every S - 1 text tokens (as the training data
        had them: ``megatron_ext.data.landmarks``) and the positions of the text tokens in them [n]."""
        T = self.config.hsa_chunk_size - 1
        b, n = input_ids.shape
        chunks = -(-n // T)
        body = F.pad(input_ids, (0, chunks * T - n)).view(b, chunks, T)
        marks = torch.full((b, chunks, 1), self.config.landmark_token_id, dtype=input_ids.dtype,
                           device=input_ids.device)
        model_ids = torch.cat([body, marks], dim=2).view(b, -1)[:, :n + n // T]
        text = torch.arange(n, device=input_ids.device)
        return model_ids, text + text // T

    def _prompt(self, input_ids, cache: Optional[HSAGPTCache]):
        c = self.config
        text_positions = None
        if c.landmark_token_id is not None:
            text_length = input_ids.shape[1]
            input_ids, text_positions = self._with_landmarks(input_ids)
        length = input_ids.shape[1]
        if self.decoder.chunked and length % c.hsa_chunk_size:
            # HSA works on whole chunks: pad to the next one. The padding only fills the last, incomplete chunk,
            # which no real token may retrieve (only complete chunks before a token's own are eligible), and every
            # other layer is causal: the real tokens' outputs are exact.
            pad = c.hsa_chunk_size - length % c.hsa_chunk_size
            input_ids = F.pad(input_ids, (0, pad))
        x = self.embedding.word_embeddings(input_ids)
        step = None if cache is None else _Step(position=0, valid=length, decoding=False)
        h = self.decoder(x, self._angles(input_ids.shape[1], x.device), cache, step)[:, :length]
        if cache is not None:
            cache.length = length
            cache.text_length = length if text_positions is None else text_length
        return h if text_positions is None else h[:, text_positions]

    def _decode(self, token, cache: HSAGPTCache):
        h = self._decode_model_token(token, cache)
        cache.text_length += 1
        landmark = self.config.landmark_token_id
        if landmark is not None and cache.text_length % (self.config.hsa_chunk_size - 1) == 0:
            # the chunk's text is complete: its landmark follows (its output predicts nothing: the text token's
            # does), and with it the chunk joins the memory
            self._decode_model_token(torch.full_like(token, landmark), cache)
        return h

    def _decode_model_token(self, token, cache: HSAGPTCache):
        x = self.embedding.word_embeddings(token)
        step = _Step(position=cache.length, valid=1, decoding=True)
        h = self.decoder(x, self._angles(1, x.device, start=cache.length), cache, step)
        cache.length += 1
        return h

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build its DynamicCache (it reads fields this config does not have): forward builds
        # an HSAGPTCache when asked to
        return False

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=None,
                                      **kwargs):
        if past_key_values is not None and past_key_values.length:
            input_ids = input_ids[:, past_key_values.text_length:]  # the tokens the cache has not seen
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past_key_values,
                  "use_cache": use_cache}
        if kwargs.get("logits_to_keep"):  # generate() asks for the last position's logits only
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
