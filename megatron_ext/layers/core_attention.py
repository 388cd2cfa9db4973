"""Core attention for full-causal, sliding-window and bidirectional (encoder) layers, efficient without TE.

megatron-core's local ``DotProductAttention`` materialises the full s x s scores and applies a window as a dense mask
(O(s^2) memory, no compute saved). :class:`LocalCoreAttention` implements megatron's core-attention contract
(``forward(q, k, v, mask, *, attn_mask_type, attention_bias, packed_seq_params) -> [sq, b, heads * d]``) with

* full causal / no mask: ``torch.nn.functional.scaled_dot_product_attention`` (cuDNN / flash / memory-efficient
  backends on CUDA), GQA without expanding K/V;
* sliding window on CUDA: FlexAttention with a block-sparse window mask (only blocks near the diagonal are computed);
* sliding window on CPU (tests, small sizes): SDPA with a dense band mask.

With Transformer Engine importable, :func:`core_attention_builder` returns ``TEDotProductAttention`` instead.
Window convention (flash-attn's ``window=(W, 0)``): query i sees keys j with 0 <= i - j <= W.
As with TE's causal kernels, the ``attention_mask`` argument is ignored for causal layers (causality and the window
are structural); bidirectional use (``no_mask``) applies no mask. Packed sequences come as ``packed_seq_params``
(sbhd layout, see ``layers/packing.py``): tokens attend within their document only.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_ext.compat.optional import te_available
from megatron_ext.kernels.alibi import alibi_slopes
from megatron_ext.layers.packing import document_ids, flat_cu_seqlens

__all__ = ["LocalCoreAttention", "core_attention_builder", "attention", "alibi_slopes", "te_available"]


# ----------------------------------------------------------------------------------------------------------------
# Functional attention on [B, H, L, D] tensors.
# ----------------------------------------------------------------------------------------------------------------
def band_mask(q_len: int, k_len: int, window: Optional[int], causal: bool, device) -> torch.Tensor:
    """Bool [q_len, k_len], True = attend. Queries are the last q_len positions of the k_len keys."""
    i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (i - j) <= window
    return keep


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _window_block_mask(q_len: int, k_len: int, window: Optional[int], device_str: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = k_len - q_len

    def sliding_window_causal(b, h, q_idx, kv_idx):
        diff = q_idx + offset - kv_idx
        return (diff >= 0) if window is None else (diff >= 0) & (diff <= window)

    return create_block_mask(sliding_window_causal, B=None, H=None, Q_LEN=q_len, KV_LEN=k_len, device=device_str)


@functools.lru_cache(maxsize=16)
def _document_block_mask(cu_key: tuple, batch: int, seq_len: int, window: Optional[int], causal: bool, device_str: str):
    """Block mask of packed documents (+ causal / window), cached by the document offsets: every attention layer
    of a step reuses the one built by the first (building it scans the whole L x L mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    cu = torch.tensor(cu_key, device=device_str)
    doc_ids = document_ids(cu, batch, seq_len)

    def document_mask(b, h, q_idx, kv_idx):
        keep = doc_ids[b, q_idx] == doc_ids[b, kv_idx]
        if causal:
            keep = keep & (q_idx >= kv_idx)
        if window is not None:
            keep = keep & (q_idx - kv_idx <= window)
        return keep

    return create_block_mask(document_mask, B=batch, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device_str)


_last_offsets: list = [None, None]  # [cu_seqlens tensor, its values as a tuple]


def _offsets_key(cu_seqlens: torch.Tensor) -> tuple:
    """The offsets as a hashable key. Reading them waits for the GPU; every layer of a step passes the same tensor
    (``packing.flat_cu_seqlens`` keeps it), so only the first layer reads."""
    if _last_offsets[0] is not cu_seqlens:
        _last_offsets[:] = [cu_seqlens, tuple(int(c) for c in cu_seqlens.tolist())]
    return _last_offsets[1]


def _flex_attention(q, k, v, block_mask, scale, gqa, slopes=None):
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None
    if slopes is not None:
        offset = k.shape[2] - q.shape[2]

        def score_mod(score, b, h, q_idx, kv_idx):  # ALiBi: slope_h * (j - i) <= 0 for past keys
            return score + slopes[h] * (kv_idx - q_idx - offset)

    fn = _compiled_flex_attention() if q.is_cuda else flex_attention  # eager on the CPU (tests)
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: Optional[int] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
    cu_seqlens: Optional[torch.Tensor] = None,
    alibi: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention on batch-first heads: q [B, Hq, Lq, D], k/v [B, Hk, Lk, D] (Hq % Hk == 0) -> [B, Hq, Lq, D].

    window: keys j with 0 <= i - j <= window only; cu_seqlens: packed documents as offsets over the flattened B*L
    tokens, sample starts included (``packing.flat_cu_seqlens``; Lq == Lk): keys of other documents are masked;
    alibi: fp32 [Hq] slopes, adds slope_h * (j - i) to the logits (DRT's lower layers). impl: 'auto' (FlexAttention
    for windows, documents and ALiBi on CUDA, else SDPA), 'sdpa' or 'flex'.
    """
    gqa = q.shape[1] != k.shape[1]
    Lq, Lk = q.shape[2], k.shape[2]
    if window is not None and window + 1 >= Lk:
        window = None  # the window covers everything: plain causal
    if cu_seqlens is not None and Lq != Lk:
        raise ValueError("packed sequences need as many keys as queries (no KV cache)")
    needs_mask = window is not None or cu_seqlens is not None or alibi is not None
    use_flex = needs_mask and (impl == "flex" or (impl == "auto" and q.is_cuda))
    if use_flex:
        if dropout_p > 0:
            raise ValueError("FlexAttention has no attention dropout: set attention_dropout=0 or attention_impl='sdpa'")
        if cu_seqlens is not None:
            block_mask = _document_block_mask(_offsets_key(cu_seqlens), q.shape[0], Lq, window, causal, str(q.device))
        elif causal:
            block_mask = _window_block_mask(Lq, Lk, window, str(q.device))
        else:
            block_mask = None
        return _flex_attention(q, k, v, block_mask, scale, gqa, alibi)
    if needs_mask or (causal and Lq != Lk):
        mask = band_mask(Lq, Lk, window, causal, q.device)
        if cu_seqlens is not None:
            doc_ids = document_ids(cu_seqlens, q.shape[0], Lq)
            mask = mask[None, None] & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        if alibi is not None:  # float mask: the ALiBi bias where attending, -inf elsewhere
            i = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
            j = torch.arange(Lk, device=q.device)[None, :]
            bias = alibi.to(q.device)[:, None, None] * (j - i).float()  # [Hq, Lq, Lk]
            mask = torch.where(mask, bias.to(q.dtype), torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)


# ----------------------------------------------------------------------------------------------------------------
# The megatron core-attention module.
# ----------------------------------------------------------------------------------------------------------------
class LocalCoreAttention(MegatronModule):
    """megatron-core core attention on SDPA / FlexAttention.

    query [sq, b, heads/TP, d], key/value [sk, b, kv_heads/TP, d] -> [sq, b, heads/TP * d].
    ``window_size`` (a constructor argument, set per layer kind through the spec) turns on the sliding window.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        window_size: Optional[int] = None,
        impl: Optional[str] = None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"LocalCoreAttention supports causal and no_mask attention, got {attn_mask_type}")
        self.layer_number = layer_number
        self.causal = attn_mask_type == AttnMaskType.causal
        self.window_size = window_size
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        impl = impl or getattr(config, "attention_impl", "auto")
        self.impl = "auto" if impl == "te" else impl
        slopes = None
        if getattr(config, "swa_alibi", False) and self.causal:  # this rank's heads' slopes (the encoder keeps RoPE)
            start, count = self._local_heads(config, pg_collection)
            slopes = alibi_slopes(config.num_attention_heads)[start : start + count]
        self.register_buffer("alibi", slopes, persistent=False)

    @staticmethod
    def _local_heads(config, pg_collection):
        if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
            rank, size = pg_collection.tp.rank(), pg_collection.tp.size()
        else:
            from megatron.core import parallel_state

            rank = parallel_state.get_tensor_model_parallel_rank()
            size = parallel_state.get_tensor_model_parallel_world_size()
        count = config.num_attention_heads // size
        return rank * count, count

    def forward(self, query, key, value, attention_mask=None, /, *, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_bias is not None:
            raise ValueError("LocalCoreAttention does not take an attention_bias")
        if packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", "sbhd") != "sbhd":
            flat_cu_seqlens(packed_seq_params, 1, 1, query.device)  # raises, naming the supported layout
        sq, b, hq, d = query.shape
        if self.causal and self.config.context_parallel_size > 1:
            return self._context_parallel_forward(query, key, value, packed_seq_params)
        cu = flat_cu_seqlens(packed_seq_params, b, sq, query.device)
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        out = attention(
            q, k, v, causal=self.causal, window=self.window_size, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0, impl=self.impl, cu_seqlens=cu, alibi=self.alibi,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)

    def _context_parallel_forward(self, query, key, value, packed_seq_params):
        """Causal (windowed) attention of this CP rank's queries over the whole sequence's keys.

        The keys/values of every rank are gathered (megatron's CP layout, see megatron_ext.parallel.context) and the
        mask is built from the queries' global positions. Memory is O(s_local * s): a correct path for CPU tests and
        moderate lengths; Transformer Engine's ring attention is the fast one.
        """
        from megatron_ext.parallel.context import cp_world, gather_sequence, global_positions

        if packed_seq_params is not None or self.alibi is not None:
            raise ValueError("LocalCoreAttention under context parallelism supports neither packed sequences nor "
                             "ALiBi: set context_parallel_size=1 or use Transformer Engine attention")
        sq, b, hq, d = query.shape
        key, value = gather_sequence(key, dim=0), gather_sequence(value, dim=0)
        sk = key.shape[0]
        rank, size = cp_world()
        pos = global_positions(sk, rank, size, device=query.device)[:, None]
        j = torch.arange(sk, device=query.device)[None, :]
        keep = j <= pos
        if self.window_size is not None:
            keep &= (pos - j) <= self.window_size
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)


def _te_core_attention(*, config, window_size=None, **kwargs):
    """TEDotProductAttention with a per-layer window (TE reads ``config.window_size``)."""
    import copy

    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    layer_config = copy.copy(config)
    layer_config.window_size = (window_size, 0) if window_size is not None else None
    layer_config.window_attn_skip_freq = None
    return TEDotProductAttention(config=layer_config, **kwargs)


def core_attention_builder(config, window_size: Optional[int] = None):
    """The ``core_attention`` builder for an SWA/full/encoder layer: TE when asked for or importable, else ours."""
    impl = getattr(config, "attention_impl", "auto")
    alibi = getattr(config, "swa_alibi", False)
    if alibi and impl == "te":
        raise ValueError("swa_alibi is implemented by our core attention (Flex score_mod / SDPA bias), not TE's: "
                         "use attention_impl='auto'")
    if impl == "te" or (impl == "auto" and te_available() and not alibi):
        if not te_available():
            raise ValueError("attention_impl='te' but transformer_engine is not importable; use 'auto'")
        return functools.partial(_te_core_attention, window_size=window_size)
    return functools.partial(LocalCoreAttention, window_size=window_size)
