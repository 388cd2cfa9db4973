"""The model provider behind ``pretrain_hsa.py``: Megatron-LM arguments -> a GPTModel for this pipeline stage.

The model comes from ``megatron_ext.models.build_model`` (the project's one model builder): the arguments become an
``HSAConfig`` through megatron's own ``core_transformer_config_from_args`` (every HSAConfig field has a flag of the
same name, see ``megatron_ext.training.arguments``).
"""

from __future__ import annotations

import torch


def describe(args) -> str:
    pattern = getattr(args, "layer_pattern", None) or "full"
    return f"GPT ({args.num_layers} layers, hidden {args.hidden_size}, attention pattern '{pattern}')"


def transformer_config_from_args(args):
    """The HSAConfig of the arguments (built on the CPU when there is no GPU)."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_ext.models import HSAConfig

    if not torch.cuda.is_available():
        args.use_cpu_initialization = True
    config = core_transformer_config_from_args(args, config_class=HSAConfig)
    if len({plan.kind for plan in config.layer_plans}) > 1 and not config.hetereogenous_dist_checkpoint:
        # Layers of different kinds have different parameters: dist_checkpointing must key them per layer instead
        # of stacking them under decoder.layers.* (field spelled this way in megatron-core).
        config.hetereogenous_dist_checkpoint = True
    return config


def check_config(args) -> None:
    """Stop at startup with the one line of an ``HSAConfig`` error (field, problem, fix), before megatron builds
    anything, instead of its traceback from inside the model provider."""
    from megatron_ext.training.runtime import startup_error

    try:
        transformer_config_from_args(args)
    except ValueError as error:
        if not str(error).startswith("HSAConfig."):
            raise
        raise startup_error(str(error)) from None


def build_model_from_args(args, *, pre_process=True, post_process=True, vp_stage=None, pg_collection=None):
    """This rank's GPTModel chunk (pipeline stage ``pre_process``/``post_process``, virtual stage ``vp_stage``)."""
    from megatron_ext.models import build_model

    config = transformer_config_from_args(args)
    return build_model(config, vocab_size=args.padded_vocab_size, pre_process=pre_process,
                       post_process=post_process, vp_stage=vp_stage, pg_collection=pg_collection)
