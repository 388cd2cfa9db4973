"""megatron's ``SelfAttention`` with the fused rotary embedding of ``megatron_ext.kernels.fused``.

Without Transformer Engine megatron-core rotates q and k with its unfused PyTorch code (``apply_rope_fusion`` needs
TE). :class:`FusedRotarySelfAttention` runs the same rotation as one Triton kernel per tensor: ``forward`` keeps
the rotary angles it is given and calls megatron's forward without them, and ``get_query_key_value_tensors`` (where
megatron derives q, k, v and applies the QK-norms) rotates q and k on the way out: the point where megatron
would have rotated them. Everything megatron's own path handles differently stays megatron's: inference, packed
THD batches, interleaved or YaRN-scaled RoPE, per-sample angles, Transformer Engine's fused RoPE, and
``fused_kernel_backend`` resolving to PyTorch (CPU).
"""

from __future__ import annotations

from megatron.core.transformer.attention import SelfAttention

from megatron_ext.kernels.fused import rotary, runs_triton

__all__ = ["FusedRotarySelfAttention"]


class FusedRotarySelfAttention(SelfAttention):
    _pending_rotary = None

    def _fuses_rotary(self, hidden_states, rotary_pos_emb, inference_context, packed_seq_params) -> bool:
        config = self.config
        if rotary_pos_emb is None or inference_context is not None or config.apply_rope_fusion:
            return False
        if config.rotary_interleaved or getattr(config, "multi_latent_attention", False) or config.no_rope_freq:
            return False
        if getattr(config, "fused_single_qkv_rope", False) or getattr(self, "_yarn_concentration_factor", 1.0) != 1.0:
            return False
        if packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", "sbhd") != "sbhd":
            return False
        embs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,)
        if any(e is None or e.dim() != 4 or tuple(e.shape[1:3]) != (1, 1) for e in embs):
            return False
        return runs_triton(getattr(config, "fused_kernel_backend", "auto"), hidden_states)

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, packed_seq_params=None, **kwargs):
        inference = inference_context if inference_context is not None else kwargs.get("inference_params")
        if not self._fuses_rotary(hidden_states, rotary_pos_emb, inference, packed_seq_params):
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   rotary_pos_emb, *args, packed_seq_params=packed_seq_params, **kwargs)
        self._pending_rotary = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
        try:
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context, None, *args,
                                   packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self._pending_rotary = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self._pending_rotary is None:
            return out
        query, key, *rest = out  # split q, k, v (and gate): rotary_pos_emb=None keeps megatron on its split path
        backend = getattr(self.config, "fused_kernel_backend", "auto")
        q_emb, k_emb = self._pending_rotary
        query = rotary(query, q_emb[: query.shape[0]], backend=backend)
        key = rotary(key, k_emb[: key.shape[0]], backend=backend)
        return (query, key, *rest)
