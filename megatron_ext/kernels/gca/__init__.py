"""Grouped Cross Attention (GCA, the DRT model): chunk-level retrieval and chunk-wise cross attention.

- `gca_retrieval(query_landmarks [B,C,Dr], landmarks [B,C,Dr], *, topk, ...) -> (indices, weights) [B,C,K]`:
  the selection made BY chunk c (chunks e < c).
- `selection_for_query_chunks(indices, weights, *, chunk_size=None, cu_seqlens=None)`: shifts it so that the
  selection made by chunk c-1 serves query chunk c, the form `gca_attention` takes.
- `gca_attention(q [B,L,Hq,D], k, v [B,Lkv,Hk,D], weights, indices [B,ceil(L/S),K], *, chunk_size, ...)`.
- `gca_decode_retrieval(query [B,Dr], landmarks [B,c,Dr], *, topk)`: the selection made by the chunk just
  completed (decode), row c of `gca_retrieval`.
- `gca_decode(q [B,T,Hq,D], k_cache, v_cache, weights, indices [B,K] or [B,T,K], *, chunk_size, ...)`.

`reference.py` holds the PyTorch definitions (the test oracle); `triton_attention.py` the training kernels
(forward, dQ/dW, dK/dV over a reverse index); `triton_decode.py` the decode kernel; `ops.py` the public functions.
"""

from .ops import gca_attention, gca_decode, gca_decode_retrieval, gca_retrieval, selection_for_query_chunks

__all__ = ["gca_attention", "gca_decode", "gca_decode_retrieval", "gca_retrieval", "selection_for_query_chunks"]
