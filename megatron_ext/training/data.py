"""Datasets and micro-batches for ``pretrain_hsa.py``.

``build_datasets(args, num_samples)`` hands Megatron-LM's data flags (``--data-path``/``--data-args-path`` blends,
``--split``, ``--train/valid/test-data-path``, ``--per-split-data-args-path``, ``--mock-data``,
``--no-mmap-bin-files``) and the project's (``--data-pack-chunk-size`` for chunk-aligned HSA packing,
``--data-landmark-chunk-size`` for GCA landmarks) to ``megatron_ext.data.provider``. ``get_batch`` moves one
micro-batch to the model's device and turns packed samples' ``cu_seqlens`` into megatron's ``PackedSeqParams``.
``build_tokenizer(args)`` is megatron's, but also reads a Hugging Face ``tokenizer.json`` file.
``skip_validation_without_data()`` turns validation off when the validation split is empty.

``check_data_against_model(args, tokenizer)`` is the one place where the data flags are checked against the model
(chunk sizes, landmarks, vocabulary), before the model is built.
"""

from __future__ import annotations

import warnings

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


def build_tokenizer(args):
    """megatron's tokenizer for ``--tokenizer-type``, except for ``HuggingFaceTokenizer`` with ``--tokenizer-model``
    a ``tokenizer.json`` file, as ``tools/preprocess_data.py`` and the example scripts take it: megatron's wrapper
    hands the path to ``AutoTokenizer.from_pretrained``, which takes only a directory. That case gets the tokenizer
    that wrote the data (``megatron_ext.data.tokenizers``: the same ids and end-of-document id)."""
    import os

    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer as megatron_build_tokenizer
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    from megatron_ext.data.tokenizers import HuggingFaceTokenizer

    path = getattr(args, "tokenizer_model", None)
    if args.tokenizer_type != "HuggingFaceTokenizer" or not path or not os.path.isfile(path):
        tokenizer = megatron_build_tokenizer(args)
        if args.tokenizer_type == "HuggingFaceTokenizer" and getattr(tokenizer, "eod", 0) is None:
            raise SystemExit(_no_end_of_document(path))
        return tokenizer
    ignored = [flag for flag, dest in (("--tokenizer-special-tokens", "special_tokens"),
                                       ("--tokenizer-metadata", "metadata_path")) if getattr(args, dest, None)]
    if ignored:  # they would add ids (and change the vocabulary size) through megatron's wrapper
        raise SystemExit(f"--tokenizer-model {path} is a tokenizer.json file, which takes no {' or '.join(ignored)}: "
                         f"declare the extra tokens in the tokenizer (tools/preprocess_data.py reads the same file, "
                         f"so the data's ids stay the model's), or give a transformers tokenizer directory instead")
    tokenizer = HuggingFaceTokenizer(path)
    if getattr(args, "pad_vocab_size", True) and getattr(args, "padded_vocab_size", None) is None:  # as megatron's
        args.padded_vocab_size = vocab_size_with_padding(tokenizer.vocab_size, args)
    return tokenizer


def _no_end_of_document(path: str) -> str:
    """The error for a Hugging Face tokenizer directory without an ``eos_token``: megatron's wrapper then has no
    end-of-document id, which mock data, chunk-aligned packing, landmarks and the EOD loss mask all need (mock data
    failed with "MockGPTDataset failed to build as a mock data generator")."""
    from megatron_ext.data.tokenizers import HuggingFaceTokenizer

    try:
        guess = HuggingFaceTokenizer(path)
        token = guess.detokenize([guess.eod]) if guess.eod is not None else None
    except Exception:  # the message stands without a guess
        token = None
    fix = (f"tools/preprocess_data.py takes {token!r} (id {guess.eod}) as end of document with this tokenizer: "
           f"name it \"eos_token\" in {path}/tokenizer_config.json, or pass {path}/tokenizer.json as "
           f"--tokenizer-model (that file's end of document is the same token)"
           if token else f"add an end-of-text token and name it \"eos_token\" in {path}/tokenizer_config.json")
    return (f"--tokenizer-model {path}: the Hugging Face tokenizer has no eos_token, so megatron has no "
            f"end-of-document id (documents could not be told apart); {fix}")


def skip_validation_without_data() -> None:
    """No validation when the validation split is empty (``--split 100,0,0``). megatron-core 0.19.2 puts the
    validation loader in a list and tests the list, not the loader, for None: it validated on no batch. Idempotent."""
    from megatron.training import get_args
    from megatron.training import training as megatron_training

    original = megatron_training.build_train_valid_test_data_loaders
    if getattr(original, "skips_empty_validation", False):
        return

    def build_train_valid_test_data_loaders(*args, **kwargs):
        train, valid, test = original(*args, **kwargs)
        if isinstance(valid, list) and all(loader is None for loader in valid):
            get_args().do_valid = False  # every rank builds the datasets (is_distributed), so all agree
        return train, valid, test

    build_train_valid_test_data_loaders.skips_empty_validation = True
    megatron_training.build_train_valid_test_data_loaders = build_train_valid_test_data_loaders


def build_datasets(args, train_val_test_num_samples):
    """(train, valid, test) datasets for megatron's loaders (None where a split is empty)."""
    from megatron.training import get_tokenizer, print_rank_0

    from megatron_ext.data.provider import build_train_valid_test_datasets

    print_rank_0("> building train, validation, and test datasets ...")
    datasets = build_train_valid_test_datasets(args, train_val_test_num_samples, get_tokenizer())
    print_rank_0("> finished creating datasets")
    return datasets


def check_data_against_model(args, tokenizer) -> None:
    """Check the data flags against the model's before the model is built; grow ``args.padded_vocab_size`` to
    cover the GCA landmark token. Safe to call again (once per model chunk).

    * ``--data-pack-chunk-size`` must be a multiple of ``--hsa-chunk-size`` when the model retrieves chunks: a
      document starting inside a model chunk breaks the chunk-local masks at the first forward.
    * ``--data-landmark-chunk-size`` must equal ``--hsa-chunk-size`` in a GCA model: the layers read the landmark
      at the end of every model chunk. A GCA model without landmarks trains, but retrieves with an ordinary text
      token in the landmark's place: warned.
    * The landmark id (default: the tokenizer's vocab size) may lie past megatron's padded vocabulary, which is
      only rounded up to ``make_vocab_size_divisible_by * TP``; the vocabulary is padded on to cover it.
    """
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
    from megatron.training import print_rank_0

    from megatron_ext.data.provider import DataConfig
    from megatron_ext.models.pattern import parse_layer_pattern

    pattern = getattr(args, "layer_pattern", None) or f"full*{args.num_layers}"
    kinds = {plan.kind for plan in parse_layer_pattern(pattern)}
    chunk = getattr(args, "hsa_chunk_size", None)
    pack = getattr(args, "data_pack_chunk_size", None)
    landmark = getattr(args, "data_landmark_chunk_size", None)
    if kinds & {"hsa", "gca"} and pack and pack % chunk:
        raise ValueError(
            f"--data-pack-chunk-size {pack} is not a multiple of the model's --hsa-chunk-size {chunk}: documents "
            f"would start inside a model chunk; use --data-pack-chunk-size {chunk}"
        )
    if "gca" in kinds:
        if landmark is None:
            warnings.warn(
                f"layer pattern {pattern!r} has GCA layers but the data has no landmark tokens: GCA then retrieves "
                f"with the last text token of each chunk. Pass --data-landmark-chunk-size {chunk} (DRT's 63 text "
                f"tokens + 1 landmark per chunk of 64).", stacklevel=2)
        elif landmark != chunk:
            raise ValueError(
                f"--data-landmark-chunk-size {landmark} differs from the model's --hsa-chunk-size {chunk}: GCA reads "
                f"the landmark at the end of every model chunk; use --data-landmark-chunk-size {chunk}"
            )
    if not landmark:
        return
    config = DataConfig.from_args(args)
    # the id in use, kept in the checkpoint's arguments (tools/convert_checkpoint_to_hf.py reads it)
    args.data_landmark_token_id = config.landmark_id(tokenizer)
    if args.padded_vocab_size is None:
        return
    needed = config.required_vocab_size(tokenizer)
    if needed > args.padded_vocab_size:
        padded = vocab_size_with_padding(needed, args, logging_enabled=False)
        print_rank_0(
            f" > padded vocab (size: {args.padded_vocab_size}) on to {padded} to cover the GCA landmark token id "
            f"{config.landmark_id(tokenizer)} (--data-landmark-token-id)"
        )
        args.padded_vocab_size = padded
