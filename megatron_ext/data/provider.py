"""The training data provider: blends, splits, mock data, GCA landmarks and chunk-aligned packing for HSA.

    train, valid, test = build_train_valid_test_datasets(config_or_args, [n_train, n_valid, n_test], tokenizer)
    loader = torch.utils.data.DataLoader(train, batch_size=b, collate_fn=collate_batch)
    batch = next(iter(loader))   # tokens, labels, loss_mask, position_ids [b, L] (+ cu_seqlens, max_seqlen)

Datasets come from megatron-core: ``GPTDataset`` (or ``MockGPTDataset``, or our ``ChunkAlignedPackedDataset``)
built through ``BlendedMegatronDatasetBuilder``, so a weighted ``--data-path 30 a 70 b`` gives a ``BlendedDataset``
and ``--split 969,30,1`` splits each prefix by documents. Samples carry no attention mask unless asked
(``create_attention_mask``): causal masking belongs to the attention kernels, and an [L, L] mask per sample is not
affordable at long context.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_ext.data.landmarks import LandmarkDataset


@dataclass
class DataConfig:
    """What the provider needs; ``from_args`` reads it from Megatron-LM-named arguments."""

    seq_length: int
    seed: int = 1234
    data_path: Optional[List[str]] = None  # --data-path: "w1 p1 w2 p2 ..." or "p1 p2 ..."
    data_args_path: Optional[str] = None  # --data-args-path: a file holding the --data-path list
    split: Optional[str] = "969,30,1"  # --split
    train_data_path: Optional[List[str]] = None  # --train-data-path / --valid-data-path / --test-data-path
    valid_data_path: Optional[List[str]] = None
    test_data_path: Optional[List[str]] = None
    per_split_data_args_path: Optional[str] = None  # --per-split-data-args-path: JSON {"train": ..., "valid": ...}
    mock_data: bool = False  # --mock-data
    data_cache_path: Optional[str] = None  # --data-cache-path
    mmap_bin_files: bool = True  # --no-mmap-bin-files reads the .bin files instead of memory-mapping them
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    mid_level_dataset_surplus: float = 0.005
    create_attention_mask: bool = False  # an [1, L, L] mask per sample: only for short contexts, never when packed
    # Extensions (flags in add_data_args):
    landmark_chunk_size: Optional[int] = None  # GCA: a landmark token ends every chunk of this many tokens
    landmark_token_id: Optional[int] = None  # default: tokenizer.vocab_size (pretrain_hsa.py pads the vocab)
    pack_chunk_size: Optional[int] = None  # HSA: pack documents starting on chunk boundaries, with cu_seqlens

    def __post_init__(self) -> None:
        for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
            paths = getattr(self, name)
            if isinstance(paths, str):
                paths = paths.split()
            setattr(self, name, list(paths) if paths else None)
        for name in ("landmark_chunk_size", "pack_chunk_size"):
            size = getattr(self, name)
            if size is not None and self.seq_length % size:
                raise ValueError(f"--seq-length {self.seq_length} must be a multiple of {name} {size}")
        if self.landmark_chunk_size is not None and self.landmark_chunk_size < 2:
            raise ValueError(f"landmark_chunk_size must be >= 2; got {self.landmark_chunk_size}")
        if (self.landmark_chunk_size and self.pack_chunk_size
                and self.landmark_chunk_size != self.pack_chunk_size):
            raise ValueError(
                f"landmark_chunk_size {self.landmark_chunk_size} and pack_chunk_size {self.pack_chunk_size} "
                f"differ: landmarks and packing must use the model's one chunk size"
            )
        if self.create_attention_mask and (self.landmark_chunk_size or self.pack_chunk_size):
            raise ValueError(
                "dense attention masks are not built for packed or landmark data: the HSA/GCA kernels mask causally "
                "(and by cu_seqlens) themselves; pass --no-create-attention-mask-in-dataloader"
            )
        if not self.mock_data and not (self.data_path or self.data_args_path or self.train_data_path
                                       or self.valid_data_path or self.test_data_path
                                       or self.per_split_data_args_path):
            raise ValueError("no data: give --data-path or --data-args-path (or --train/valid/test-data-path or "
                             "--per-split-data-args-path), or --mock-data")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataConfig":
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        return cls(
            seq_length=args.seq_length, seed=get("seed", 1234), data_path=get("data_path"),
            data_args_path=get("data_args_path"), split=get("split") or "969,30,1",
            train_data_path=get("train_data_path"), valid_data_path=get("valid_data_path"),
            test_data_path=get("test_data_path"), per_split_data_args_path=get("per_split_data_args_path"),
            mock_data=bool(get("mock_data", False)), data_cache_path=get("data_cache_path"),
            mmap_bin_files=bool(get("mmap_bin_files", True)),
            reset_position_ids=bool(get("reset_position_ids", False)),
            reset_attention_mask=bool(get("reset_attention_mask", False)),
            eod_mask_loss=bool(get("eod_mask_loss", False)),
            mid_level_dataset_surplus=get("mid_level_dataset_surplus", 0.005) or 0.005,
            create_attention_mask=bool(get("create_attention_mask_in_dataloader", False)),
            landmark_chunk_size=get("data_landmark_chunk_size"), landmark_token_id=get("data_landmark_token_id"),
            pack_chunk_size=get("data_pack_chunk_size"),
        )

    def landmark_id(self, tokenizer) -> Optional[int]:
        """The landmark token id in use (None without landmarks)."""
        if not self.landmark_chunk_size:
            return None
        return tokenizer.vocab_size if self.landmark_token_id is None else self.landmark_token_id

    def required_vocab_size(self, tokenizer) -> int:
        """The smallest model vocabulary that covers every id in the batches (text ids and the landmark)."""
        landmark = self.landmark_id(tokenizer)
        return tokenizer.vocab_size if landmark is None else max(tokenizer.vocab_size, landmark + 1)

    @property
    def text_tokens_per_sample(self) -> int:
        """Text tokens drawn per sample: seq_length, less one slot per chunk for landmarks."""
        if self.landmark_chunk_size:
            return self.seq_length // self.landmark_chunk_size * (self.landmark_chunk_size - 1)
        return self.seq_length


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The data flags this project adds to Megatron-LM's (all under the --data- prefix)."""
    group = parser.add_argument_group("HSA/GCA data")
    group.add_argument("--data-landmark-chunk-size", type=int, default=None,
                       help="GCA: insert a landmark token after every chunk_size-1 tokens (the model's chunk size)")
    group.add_argument("--data-landmark-token-id", type=int, default=None,
                       help="id of the landmark token (default: the tokenizer's vocab size; pretrain_hsa.py pads the "
                            "model's vocabulary to cover it)")
    group.add_argument("--data-pack-chunk-size", type=int, default=None,
                       help="HSA: pack documents so each starts on a chunk boundary; batches carry cu_seqlens")
    return parser


def gpt_dataset_config(config: DataConfig, tokenizer):
    """The megatron-core dataset config for this data config (GPTDatasetConfig, or the packed variant)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megatron_ext.data.packing import PackedGPTDatasetConfig

    from megatron.training.utils import get_blend_and_blend_per_split

    # Megatron-LM's own reading of --data-path/--data-args-path and the per-split flags (same precedence).
    blend, blend_per_split = (None, None) if config.mock_data else get_blend_and_blend_per_split(config)
    kwargs = dict(
        random_seed=config.seed,
        sequence_length=config.text_tokens_per_sample,
        blend=blend,
        blend_per_split=blend_per_split,
        split=None if blend_per_split is not None else config.split,
        path_to_cache=config.data_cache_path,
        mmap_bin_files=config.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=config.reset_attention_mask,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=config.create_attention_mask,
        mid_level_dataset_surplus=config.mid_level_dataset_surplus,
    )
    if config.mock_data:
        kwargs["split"] = config.split or "1,1,1"
    if config.pack_chunk_size:
        s = config.pack_chunk_size
        return PackedGPTDatasetConfig(
            **kwargs, pack_chunk_size=s, tokens_per_chunk=s - 1 if config.landmark_chunk_size else s
        )
    return GPTDatasetConfig(**kwargs)


def build_train_valid_test_datasets(
    config_or_args, num_samples: Sequence[Optional[int]], tokenizer,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
):
    """(train, valid, test) datasets; a split is None where it has no data. Samples are dicts of tensors.

    ``num_samples``: samples wanted per split (train_iters * global_batch_size, ...), as in Megatron-LM.
    ``is_built_on_rank``: Megatron-LM builds only on ranks that read data (TP rank 0, first/last PP stage).
    With landmarks, the model's (padded) vocabulary must be at least ``config.required_vocab_size(tokenizer)``.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    from megatron_ext.data.packing import ChunkAlignedPackedDataset

    config = config_or_args if isinstance(config_or_args, DataConfig) else DataConfig.from_args(config_or_args)
    if config.pack_chunk_size:
        cls = ChunkAlignedPackedDataset
    else:
        cls = MockGPTDataset if config.mock_data else GPTDataset
    datasets = BlendedMegatronDatasetBuilder(
        cls, list(num_samples), is_built_on_rank or (lambda: True), gpt_dataset_config(config, tokenizer)
    ).build()
    if config.landmark_chunk_size:
        landmark = config.landmark_id(tokenizer)
        datasets = [
            None if d is None else LandmarkDataset(d, config.landmark_chunk_size, landmark, tokenizer.eod,
                                                    config.reset_position_ids)
            for d in datasets
        ]
    return tuple(datasets)


def collate_batch(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack samples into a batch: ``tokens, labels, position_ids [B, L] int64``, ``loss_mask [B, L] float32``.

    Packed samples also give ``cu_seqlens [n_segments + 1] int32``: segment boundaries over the batch flattened
    to one sequence of B*L tokens (the varlen convention; all multiples of the chunk size), and ``max_seqlen``.
    """
    batch: Dict[str, torch.Tensor] = {}
    for key in ("tokens", "labels", "position_ids"):
        batch[key] = torch.stack([s[key] for s in samples]).long()
    batch["loss_mask"] = torch.stack([s["loss_mask"] for s in samples]).float()
    if "attention_mask" in samples[0]:
        batch["attention_mask"] = torch.stack([s["attention_mask"] for s in samples])
    if "dataset_id" in samples[0]:
        batch["dataset_id"] = torch.tensor([int(s["dataset_id"]) for s in samples])
    if "cu_seqlens" in samples[0]:
        length = batch["tokens"].shape[1]
        bounds = [torch.zeros(1, dtype=torch.int64)]
        for b, s in enumerate(samples):
            cu = torch.unique_consecutive(s["cu_seqlens"].long())  # drops the repeated L padding
            bounds.append(cu[1:] + b * length)
        cu_seqlens = torch.cat(bounds)
        batch["cu_seqlens"] = cu_seqlens.to(torch.int32)
        batch["max_seqlen"] = (cu_seqlens[1:] - cu_seqlens[:-1]).max().to(torch.int32)
    return batch
