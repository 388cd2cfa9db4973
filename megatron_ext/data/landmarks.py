"""GCA's landmark token, inserted as a dataset transform.

GCA (and the LMK-token HSA variant) marks the end of every chunk of S tokens with a landmark token: after every
S - 1 text tokens comes one landmark, so chunk c holds text in positions [c*S, c*S + S - 1) and its landmark at
c*S + S - 1. The wrapped dataset is built with ``(L // S) * (S - 1)`` text tokens per sample; this transform
spreads them out to L positions.

Targets: every *text* position keeps its label, the next text token (it skips a landmark in between, so the
language-model loss over text is that of a model without landmarks); landmark positions get ``loss_mask`` 0
(their label is set to the next text token as well, any valid id would do). Position ids count landmarks
(``arange(L)``, or restarting after each EOD when the config resets them). A packed sample's ``cu_seqlens``
(multiples of S - 1 text tokens) are rescaled to multiples of S.
"""

from __future__ import annotations

from typing import Dict

import torch


def landmark_positions(seq_length: int, chunk_size: int) -> torch.Tensor:
    """Positions of the landmark tokens in a sample of ``seq_length``: ``[seq_length // chunk_size]``."""
    return torch.arange(chunk_size - 1, seq_length, chunk_size)


def _spread(x: torch.Tensor, chunk_size: int, fill) -> torch.Tensor:
    """[n_chunks * (S-1)] -> [n_chunks * S] with ``fill`` (a scalar or a [n_chunks] tensor) in each last slot."""
    body = x.view(-1, chunk_size - 1)
    tail = torch.as_tensor(fill, dtype=x.dtype).expand(body.shape[0]).unsqueeze(1)
    return torch.cat([body, tail], dim=1).reshape(-1)


def insert_landmarks(sample: Dict[str, torch.Tensor], chunk_size: int, landmark_token_id: int, eod: int,
                     reset_position_ids: bool = False) -> Dict[str, torch.Tensor]:
    """Transform one sample of ``(L/S)*(S-1)`` text tokens into one of L tokens with landmarks."""
    s = chunk_size
    tokens, labels = sample["tokens"], sample["labels"]
    if tokens.numel() % (s - 1):
        raise ValueError(f"sample of {tokens.numel()} tokens is not a whole number of chunks of {s - 1} text tokens")
    body_labels = labels.view(-1, s - 1)
    out = dict(sample)
    out["tokens"] = _spread(tokens, s, landmark_token_id)
    out["labels"] = _spread(labels, s, body_labels[:, -1])  # = the next text token
    out["loss_mask"] = _spread(sample["loss_mask"], s, 0.0)
    n = out["tokens"].numel()
    if "cu_seqlens" in sample:  # packed: positions restart at every document segment
        cu = sample["cu_seqlens"].long() // (s - 1) * s
        starts = cu[:-1][cu[:-1] < n]
        out["cu_seqlens"] = cu.to(torch.int32)
    elif reset_position_ids:  # restart after every EOD
        starts = torch.nonzero(out["tokens"][:-1] == eod).flatten() + 1
    else:
        starts = torch.zeros(1, dtype=torch.long)
    segment_start = torch.zeros(n, dtype=torch.long)
    segment_start[starts] = starts
    out["position_ids"] = torch.arange(n) - torch.cummax(segment_start, dim=0).values
    return out


class LandmarkDataset(torch.utils.data.Dataset):
    """Wrap a (top-level) dataset whose samples hold (L/S)*(S-1) text tokens; yield L-token samples."""

    def __init__(self, dataset, chunk_size: int, landmark_token_id: int, eod: int,
                 reset_position_ids: bool = False) -> None:
        if chunk_size < 2:
            raise ValueError(f"landmark chunk_size must be >= 2; got {chunk_size}")
        self.dataset = dataset
        self.chunk_size = chunk_size
        self.landmark_token_id = landmark_token_id
        self.eod = eod
        self.reset_position_ids = reset_position_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        return insert_landmarks(self.dataset[idx], self.chunk_size, self.landmark_token_id, self.eod,
                                self.reset_position_ids)
