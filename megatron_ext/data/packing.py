"""Chunk-aligned packing for HSA: every document starts on a chunk boundary, and samples carry ``cu_seqlens``.

HSA retrieves whole chunks of S tokens and, when documents are packed, only chunks of the query's own document
(the kernels take ``cu_seqlens``, whose entries must be multiples of S). So documents are laid out as one
stream in which each document is padded up to a multiple of the chunk length, and samples are consecutive
windows of that stream. A document longer than what is left of a window continues at the start of the next
window of the stream (again a chunk boundary). Nothing but the last partial chunk of a document is padding.

Per sample (``L`` = sequence length, S = chunk size; with GCA landmarks a chunk holds S - 1 text tokens here and
the landmark transform then inserts the landmark tokens, see ``landmarks.py``):

- ``tokens [L]`` and ``labels [L]``: labels are the next token *of the same document*; a document's last token
  and padding positions have ``loss_mask`` 0 (padding tokens are the EOD id, a valid embedding row).
- ``position_ids [L]``: restart at 0 at every document segment.
- ``cu_seqlens [L // S + 1] int32``: segment boundaries, all multiples of S, starting 0 and ending L, padded at
  the end by repeating L (so samples stack); ``collate_batch`` removes the repeats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTLowLevelDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split


@dataclass
class PackedGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus the chunk geometry. ``sequence_length`` is the number of text-token slots per sample
    (``(L // S) * tokens_per_chunk``)."""

    pack_chunk_size: int = 0
    """S: the chunk size of the model."""

    tokens_per_chunk: int = 0
    """Text tokens per chunk: S, or S - 1 when a GCA landmark token will be inserted into every chunk."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pack_chunk_size <= 0 or not 0 < self.tokens_per_chunk <= self.pack_chunk_size:
            raise ValueError(
                f"packing needs pack_chunk_size > 0 and 0 < tokens_per_chunk <= pack_chunk_size; got "
                f"{self.pack_chunk_size}, {self.tokens_per_chunk}"
            )
        if self.sequence_length % self.tokens_per_chunk:
            raise ValueError(
                f"packed sequence_length {self.sequence_length} is not a multiple of tokens_per_chunk "
                f"{self.tokens_per_chunk}"
            )


class ChunkAlignedPackedDataset(MegatronDataset):
    """Mid-level dataset (works under BlendedMegatronDatasetBuilder and BlendedDataset, and on mock data)."""

    def __init__(
        self,
        indexed_dataset,
        dataset_path: Optional[str],
        indexed_indices: np.ndarray,
        num_samples: Optional[int],
        index_split: Split,
        config: PackedGPTDatasetConfig,
    ) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.slots = config.sequence_length  # text-token slots per sample
        self.chunk = config.tokens_per_chunk
        self.eod = config.tokenizer.eod
        indexed_indices = np.asarray(indexed_indices, dtype=np.int64)
        lengths = np.asarray(indexed_dataset.sequence_lengths, dtype=np.int64)[indexed_indices]
        indexed_indices, lengths = indexed_indices[lengths > 0], lengths[lengths > 0]
        padded = -(-lengths // self.chunk) * self.chunk
        per_epoch = int(padded.sum())
        if per_epoch == 0:
            raise ValueError(f"{dataset_path}: the {index_split.name} split holds no tokens")
        epochs = 1 if num_samples is None else max(1, -(-num_samples * self.slots // per_epoch))
        rng = np.random.RandomState(config.random_seed)
        order = np.concatenate([rng.permutation(len(indexed_indices)) for _ in range(epochs)])
        self.doc_ids = indexed_indices[order]  # low-level document per stream slot
        self.doc_lengths = lengths[order]
        self.doc_ends = np.cumsum(padded[order])  # end of each padded document in the stream
        self.num_windows = int(self.doc_ends[-1] // self.slots)
        self.shuffle_index = rng.permutation(self.num_windows)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset) -> int:
        return len(low_level_dataset.sequence_lengths)

    @staticmethod
    def build_low_level_dataset(dataset_path: Optional[str], config: PackedGPTDatasetConfig):
        if dataset_path is None:  # mock data
            return MockGPTLowLevelDataset(config.tokenizer)
        return IndexedDataset(dataset_path, multimodal=False, mmap=config.mmap_bin_files)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return MegatronDataset._key_config_attributes() + ["pack_chunk_size", "tokens_per_chunk"]

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        n = self.slots
        start = int(self.shuffle_index[idx]) * n
        tokens = np.full(n, self.eod, dtype=np.int64)
        labels = np.full(n, self.eod, dtype=np.int64)
        loss_mask = np.zeros(n, dtype=np.float32)
        position_ids = np.zeros(n, dtype=np.int64)
        boundaries = [0]
        k = int(np.searchsorted(self.doc_ends, start, side="right"))
        while k < len(self.doc_ends):
            length = int(self.doc_lengths[k])
            doc_start = int(self.doc_ends[k]) - (-(-length // self.chunk) * self.chunk)
            if doc_start >= start + n:
                break
            seg_begin, seg_end = max(doc_start, start), min(int(self.doc_ends[k]), start + n)
            offset = seg_begin - doc_start  # tokens of this document already placed in earlier windows
            real = min(length - offset, seg_end - seg_begin)
            continues = offset + real < length
            text = self.dataset.get(int(self.doc_ids[k]), offset=offset, length=real + int(continues))
            a = seg_begin - start
            tokens[a:a + real] = text[:real]
            labels[a:a + real - 1] = text[1:real]
            loss_mask[a:a + real - 1] = 1.0
            if continues:  # the next token lies in the next window: still a valid target
                labels[a + real - 1] = text[real]
                loss_mask[a + real - 1] = 1.0
            position_ids[a:seg_end - start] = np.arange(seg_end - seg_begin)
            boundaries.append(seg_end - start)
            k += 1
        if self.config.eod_mask_loss:
            loss_mask[tokens == self.eod] = 0.0
        cu_seqlens = np.full(n // self.chunk + 1, n, dtype=np.int32)
        cu_seqlens[: len(boundaries)] = boundaries
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
        }
