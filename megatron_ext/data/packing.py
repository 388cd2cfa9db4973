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

The index (document order per epoch, each window's first document and offset, the window shuffle) costs 4 bytes
per document and epoch plus 16 per window; with ``path_to_cache`` it is saved as ``.npy`` by rank 0 and
memory-mapped by every rank, like megatron-core's GPTDataset indices.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTLowLevelDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split
from megatron.core.utils import log_single_rank

logger = logging.getLogger(__name__)


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
        self.sequence_lengths = indexed_dataset.sequence_lengths  # mmap'd for an IndexedDataset
        self.doc_order, self.window_doc, self.window_offset, self.shuffle_index = self._load_or_build_index()

    def _build_index(self):
        """The stream layout, reduced to what a window needs: the document order, and for every window the
        position (in that order) of its first document and the offset into it. O(documents x epochs) memory:
        4 bytes per document and epoch, 16 bytes per window."""
        indices = np.asarray(self.indices, dtype=np.int64)
        lengths = np.asarray(self.sequence_lengths, dtype=np.int64)[indices]
        indices, lengths = indices[lengths > 0], lengths[lengths > 0]
        padded = -(-lengths // self.chunk) * self.chunk
        per_epoch = int(padded.sum())
        if per_epoch == 0:
            raise ValueError(f"{self.dataset_path}: the {self.index_split.name} split holds no tokens")
        log_single_rank(
            logger, logging.INFO,
            f"chunk-aligned packing of {self.dataset_path} ({self.index_split.name}): "
            f"{1 - lengths.sum() / per_epoch:.1%} of the slots are padding to chunk boundaries of {self.chunk}",
        )
        epochs = 1 if self.num_samples is None else max(1, -(-self.num_samples * self.slots // per_epoch))
        rng = np.random.RandomState(self.config.random_seed)
        order = np.concatenate([rng.permutation(len(indices)) for _ in range(epochs)])
        id_dtype = np.int32 if len(self.sequence_lengths) < np.iinfo(np.int32).max else np.int64
        doc_order = indices[order].astype(id_dtype)
        ends = np.cumsum(padded[order])  # end of each padded document in the stream
        num_windows = int(ends[-1] // self.slots)
        starts = np.arange(num_windows, dtype=np.int64) * self.slots
        window_doc = np.searchsorted(ends, starts, side="right")
        window_offset = starts - (ends[window_doc] - padded[order][window_doc])
        shuffle_index = rng.permutation(num_windows).astype(np.int64)
        return doc_order, window_doc.astype(np.int64), window_offset.astype(np.int64), shuffle_index

    def _load_or_build_index(self):
        """Like GPTDataset: cached as .npy under ``path_to_cache`` (built on rank 0, memory-mapped by everyone)."""
        names = ("doc_order", "window_doc", "window_offset", "shuffle_index")
        cache = self.config.path_to_cache
        if not cache:
            return self._build_index()
        base = os.path.join(cache, f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}")
        paths = [f"{base}-{name}.npy" for name in names]
        if not all(os.path.isfile(p) for p in paths):
            arrays = self._build_index()
            if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
                return arrays  # rank 0's cache is not visible here (node-local disk): the build is deterministic
            os.makedirs(cache, exist_ok=True)
            with open(f"{base}-description.txt", "w") as f:
                f.write(self.unique_description)
            for path, array in zip(paths, arrays):  # written under a tmp name: a reader never sees half a file
                with open(path + ".tmp", "wb") as f:
                    np.save(f, array)
                os.replace(path + ".tmp", path)
        return tuple(np.load(p, mmap_mode="r") for p in paths)

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
        return len(self.shuffle_index)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        n, t = self.slots, self.chunk
        window = int(self.shuffle_index[idx])
        k, offset = int(self.window_doc[window]), int(self.window_offset[window])
        tokens = np.full(n, self.eod, dtype=np.int64)
        labels = np.full(n, self.eod, dtype=np.int64)
        loss_mask = np.zeros(n, dtype=np.float32)
        position_ids = np.zeros(n, dtype=np.int64)
        boundaries = [0]
        pos = 0
        while pos < n:
            doc = int(self.doc_order[k])
            length = int(self.sequence_lengths[doc])
            # offset: tokens of this document placed in earlier windows (a multiple of t, so < length)
            segment = min(-(-length // t) * t - offset, n - pos)  # text plus padding to the chunk boundary
            real = min(length - offset, segment)
            continues = offset + real < length
            text = self.dataset.get(doc, offset=offset, length=real + int(continues))
            tokens[pos:pos + real] = text[:real]
            labels[pos:pos + real - 1] = text[1:real]
            loss_mask[pos:pos + real - 1] = 1.0
            if continues:  # the next token lies in the next window: still a valid target
                labels[pos + real - 1] = text[real]
                loss_mask[pos + real - 1] = 1.0
            position_ids[pos:pos + segment] = np.arange(segment)
            pos += segment
            boundaries.append(pos)
            k, offset = k + 1, 0
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
