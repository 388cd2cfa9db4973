"""Datasets and micro-batches for ``pretrain_hsa.py``.

``build_datasets(args, num_samples)`` hands Megatron-LM's data flags (``--data-path`` blends, ``--split``,
``--train/valid/test-data-path``, ``--mock-data``) and the project's (``--data-pack-chunk-size`` for chunk-aligned
HSA packing, ``--data-landmark-chunk-size`` for GCA landmarks) to ``megatron_ext.data.provider``. ``get_batch``
moves one micro-batch to the model's device and turns packed samples' ``cu_seqlens`` into megatron's
``PackedSeqParams``.
"""

from __future__ import annotations

import torch


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def get_batch(data_iterator):
    """The next micro-batch on this rank's device as a dict.

    tokens/labels/position_ids: [b, s] int64; loss_mask: [b, s] float; attention_mask: [b, 1, s, s] bool or None;
    packed_seq_params: ``PackedSeqParams`` (sbhd) when the samples are packed documents, else None.
    Every tensor-parallel rank of a data-parallel replica draws the same sample from its own loader (megatron's
    samplers shard by data-parallel rank only), so no broadcast over the TP group is needed.
    """
    batch = next(data_iterator)
    packed_seq_params = None
    if "cu_seqlens" in batch:
        from megatron_ext.data.provider import collate_batch
        from megatron_ext.layers.packing import packed_seq_params as make_packed_seq_params

        # megatron's loader stacks per-sample cu_seqlens; re-collate into the flat varlen form the layers take.
        size = batch["tokens"].shape[0]
        batch = collate_batch([{k: v[i] for k, v in batch.items()} for i in range(size)])
        packed_seq_params = make_packed_seq_params(batch["cu_seqlens"].to(_device()), batch["tokens"].shape[1])
    device = _device()
    out = {
        "tokens": batch["tokens"].to(device, non_blocking=True).long(),
        "labels": batch["labels"].to(device, non_blocking=True).long(),
        "loss_mask": batch["loss_mask"].to(device, non_blocking=True).float(),
        "position_ids": batch["position_ids"].to(device, non_blocking=True).long(),
        "attention_mask": None,
        "packed_seq_params": packed_seq_params,
    }
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    from megatron_ext.parallel.context import batch_for_this_cp_rank

    return batch_for_this_cp_rank(out)  # context parallelism: this rank's two pieces of every sequence


def build_datasets(args, train_val_test_num_samples):
    """(train, valid, test) datasets for megatron's loaders (None where a split is empty)."""
    from megatron.training import get_tokenizer, print_rank_0

    from megatron_ext.data.provider import build_train_valid_test_datasets

    print_rank_0("> building train, validation, and test datasets ...")
    datasets = build_train_valid_test_datasets(args, train_val_test_num_samples, get_tokenizer())
    print_rank_0("> finished creating datasets")
    return datasets
