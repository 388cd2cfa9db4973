"""Datasets and micro-batches for ``pretrain_hsa.py``.

``build_datasets(args, num_samples)`` returns (train, valid, test) for megatron's data loaders:
``--mock-data`` gives megatron's ``MockGPTDataset``; ``--data-path``/``--train-data-path``/... give a
``GPTDataset`` blend, both through ``BlendedMegatronDatasetBuilder``. ``get_batch`` moves one micro-batch to the
model's device.
"""

from __future__ import annotations

import torch


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def get_batch(data_iterator):
    """(tokens, labels, loss_mask, attention_mask, position_ids) of the next micro-batch, on this rank's device.

    tokens/labels/position_ids: [b, s] int64; loss_mask: [b, s] float; attention_mask: [b, 1, s, s] bool or None.
    """
    # Every tensor-parallel rank of a data-parallel replica draws the same sample from its own loader (megatron's
    # samplers shard by data-parallel rank only), so no broadcast over the TP group is needed.
    batch = next(data_iterator)
    device = _device()
    tokens = batch["tokens"].to(device, non_blocking=True).long()
    labels = batch["labels"].to(device, non_blocking=True).long()
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()
    position_ids = batch["position_ids"].to(device, non_blocking=True).long()
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device, non_blocking=True)
    return tokens, labels, loss_mask, attention_mask, position_ids


def build_datasets(args, train_val_test_num_samples):
    """(train, valid, test) datasets for megatron's loaders (None where a split is empty)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_tokenizer, print_rank_0
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    if not args.mock_data and blend is None and blend_per_split is None:
        raise ValueError("no training data: give --data-path PREFIX (see tools/preprocess_data.py), "
                         "--train-data-path/--valid-data-path, or --mock-data")
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )
    dataset_cls = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building train, validation, and test datasets ({dataset_cls.__name__}) ...")
    train, valid, test = BlendedMegatronDatasetBuilder(
        dataset_cls, train_val_test_num_samples, lambda: True, config
    ).build()
    print_rank_0("> finished creating datasets")
    return train, valid, test
