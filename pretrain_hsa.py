#!/usr/bin/env python
"""Pretrain a GPT with sliding-window, HSA and GCA attention layers on megatron-core.

Reads like Megatron-LM's ``pretrain_gpt.py``: a model provider, a forward step and a datasets provider handed to
``megatron.training.pretrain``, which owns the production loop (Megatron DDP, the distributed optimizer, pipeline
schedules, ``OptimizerParamScheduler``, ``dist_checkpointing``, TensorBoard, ``--exit-interval``, signal handling).
Every Megatron-LM flag keeps its name; the HSA/GCA options live in one argument group (``--hsa-*``/``--gca-*``);
``--config FILE.yaml`` sets defaults that the command line overrides.

The same script runs a tiny config on the CPU over gloo (``megatron_ext.compat.cpu``) and a real one on GPUs::

    torchrun --nproc-per-node 8 pretrain_hsa.py --config examples/swa_hsa_345m.yaml --save ckpt --load ckpt
    python -m megatron_ext.demo     # one CPU process, gloo: a tiny SWA+HSA model (flags in megatron_ext/demo.py)
"""

import time

_PROGRAM_START = time.time()

from functools import partial  # noqa: E402

import torch  # noqa: E402

from megatron_ext.training import runtime  # noqa: E402

runtime.prepare_process()  # CPU shims, single-process rendezvous defaults; before megatron builds anything

from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.rerun_state_machine import get_rerun_state_machine  # noqa: E402
from megatron.training import get_args, get_timers, get_tokenizer, pretrain, print_rank_0  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402
from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: E402
from megatron.training.training import set_startup_timestamps  # noqa: E402

from megatron_ext.training import arguments as hsa_arguments  # noqa: E402
from megatron_ext.training import data as hsa_data  # noqa: E402
from megatron_ext.training import logging as hsa_logging  # noqa: E402
from megatron_ext.training import model as hsa_model  # noqa: E402


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Build this rank's GPTModel (one pipeline stage, one virtual stage) from the parsed arguments."""
    args = get_args()
    hsa_data.check_data_against_model(args, get_tokenizer())  # may pad the vocabulary for the landmark token
    print_rank_0(f"building {hsa_model.describe(args)} ...")
    model = hsa_model.build_model_from_args(args, pre_process=pre_process, post_process=post_process,
                                            vp_stage=vp_stage, pg_collection=pg_collection)
    hsa_logging.register_model_chunk(model)  # the FLOP model counts its parameters
    return model


_NO_BATCH = dict.fromkeys(("tokens", "labels", "loss_mask", "attention_mask", "position_ids", "packed_seq_params"))


def get_batch(data_iterator):
    """This rank's micro-batch (tokens, labels, loss_mask, attention_mask, position_ids, packed_seq_params).

    Every pipeline stage reads it: middle stages take their activations from the previous stage but still need the
    packed documents' boundaries (``packed_seq_params``) for their attention masks.
    """
    if data_iterator is None:
        return dict(_NO_BATCH)
    return hsa_data.get_batch(data_iterator)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of the masked token losses, the token count, and the ``lm loss`` report (megatron's 3-tuple contract)."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    # Megatron's NaN/Inf guard (and fault injection for reruns) sees the loss before it reaches backward.
    get_rerun_state_machine().validate_result(
        result=loss, rejection_func=torch.isnan, message="found NaN in local forward loss calculation",
        tolerance=0.0, fatal=True,
    )
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch through the model; returns the per-token losses and the loss function to reduce them."""
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator)
    timers("batch-generator").stop()
    output_tensor = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                          loss_mask=batch["loss_mask"], packed_seq_params=batch["packed_seq_params"])
    return output_tensor, partial(loss_func, batch["loss_mask"])


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Train/validation/test datasets for ``train_val_test_num_samples`` samples each (mock, blend or packed)."""
    return hsa_data.build_datasets(get_args(), train_val_test_num_samples)


train_valid_test_datasets_provider.is_distributed = True


if __name__ == "__main__":
    set_startup_timestamps(program_start=_PROGRAM_START, main_entry=time.time())
    args = parse_and_validate_args(
        extra_args_provider=hsa_arguments.add_hsa_arguments,
        args_defaults=hsa_arguments.ARGS_DEFAULTS,
    )
    runtime.install_training_hooks(args)
    runtime.run_failing_fast(
        pretrain,
        pretrain_cfg_container_from_args(args),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )
