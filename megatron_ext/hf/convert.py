"""Megatron checkpoints of ``pretrain_hsa.py`` -> Hugging Face model directories.

``load_megatron_checkpoint(path)`` reads a checkpoint saved in any tensor/pipeline layout (``torch_dist``, resharded
to one rank on load; or ``torch`` format when it was saved by one rank) into one CPU model built from the arguments
stored in the checkpoint; ``save_hf_directory`` writes ``config.json``, ``model.safetensors`` and the model code
(``configuration_hsa_gpt.py``, ``modeling_hsa_gpt.py``: ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` loads it, as does ``megatron_ext.hf.HSAGPTForCausalLM.from_pretrained(dir)``).
The CLI is ``tools/convert_checkpoint_to_hf.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from argparse import Namespace
from typing import NamedTuple

import torch

__all__ = ["hf_config_fields", "hf_state_dict", "load_megatron_checkpoint", "save_hf_directory",
           "resolve_checkpoint_dir"]

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_FILES = ("configuration_hsa_gpt.py", "modeling_hsa_gpt.py")


def _unsupported(config) -> list[str]:
    """What the Hugging Face model does not implement, as 'what (how to tell)' lines."""
    problems = []
    kinds = {plan.kind for plan in config.layer_plans}
    if kinds - {"full", "swa", "hsa", "gca"}:
        problems.append(f"layer kinds {sorted(kinds - {'full', 'swa', 'hsa', 'gca'})} (only full, swa, hsa and gca "
                        f"convert)")
    if config.num_moe_experts:
        problems += _unsupported_moe(config)
    if config.position_embedding_type not in ("rope", "none"):
        problems.append(f"position_embedding_type {config.position_embedding_type!r}")
    if config.use_rope_scaling or config.rotary_seq_len_interpolation_factor or config.rotary_interleaved:
        problems.append("RoPE scaling, interpolation or interleaving")
    if config.multi_latent_attention or config.layernorm_zero_centered_gamma:
        problems.append("multi-latent attention or zero-centred norms")
    if config.activation_func not in (torch.nn.functional.silu, torch.nn.functional.gelu):
        problems.append(f"activation {getattr(config.activation_func, '__name__', config.activation_func)}")
    # megatron options that change the forward pass and the Hugging Face model does not implement
    if config.use_mup:
        problems.append("muP scaling of embeddings, attention and logits (use_mup)")
    if config.no_rope_freq:
        problems.append("layers without RoPE (no_rope_freq)")
    if config.attention_output_gate:
        problems.append("gated attention output (attention_output_gate)")
    if config.glu_linear_offset or config.activation_func_clamp_value is not None:
        problems.append("a GLU offset or clamped activations (glu_linear_offset, activation_func_clamp_value)")
    if config.softmax_type != "vanilla":  # Transformer Engine's attention applies it
        problems.append(f"softmax_type {config.softmax_type!r} in full/swa attention")
    return problems


def _unsupported_moe(config) -> list[str]:
    """The MoE options whose forward pass the Hugging Face model's ``MoE`` does not reproduce."""
    problems = []
    options = {
        "moe_expert_capacity_factor": "token dropping",
        "moe_router_num_groups": "group-limited routing",
        "moe_router_group_topk": "group-limited routing",
        "moe_router_topk_limited_devices": "device-limited routing",
        "moe_shared_expert_gate": "a gated shared expert",
        "moe_apply_probs_on_input": "router probabilities applied to the expert input",
        "moe_latent_size": "latent MoE",
        "moe_mlp_glu_interleave_size": "interleaved GLU experts",
        "moe_shared_expert_glu_interleave_size": "an interleaved GLU shared expert",
        "moe_router_force_biased": "forced router bias",
    }
    for name, what in options.items():
        if getattr(config, name, None):
            problems.append(f"{what} ({name})")
    if config.moe_router_score_function not in ("softmax", "sigmoid"):
        problems.append(f"moe_router_score_function {config.moe_router_score_function!r}")
    balancing = config.moe_router_load_balancing_type
    if "quantile_balancing" in (balancing if isinstance(balancing, list) else [balancing]):
        problems.append("quantile-balanced routing (moe_router_load_balancing_type)")
    return problems


def hf_config_fields(config, vocab_size: int, landmark_token_id: int | None = None,
                     landmark_chunk_size: int | None = None) -> dict:
    """The ``config.json`` fields (``HSAGPTConfig``) of a megatron ``HSAConfig``; ValueError if it has parts the
    Hugging Face model does not implement. ``landmark_token_id``: the landmark of a GCA model's training data
    (``--data-landmark-chunk-size``, ``landmark_chunk_size``), which the Hugging Face model inserts itself at the end
    of each of its chunks; the vocabulary keeps its row."""
    problems = _unsupported(config)
    if landmark_token_id is not None and landmark_chunk_size is not None and (
            config.retrieval_kind is None or landmark_chunk_size != config.hsa_chunk_size):
        problems.append(f"landmark tokens every {landmark_chunk_size} tokens in its data, which is not its chunk size "
                        f"(the Hugging Face model inserts them at the end of each of its HSA/GCA chunks)")
    if problems:
        raise ValueError("this model cannot be converted to the Hugging Face model of megatron_ext.hf: it has "
                         + "; ".join(problems))
    activation = "silu" if config.activation_func is torch.nn.functional.silu else "gelu"
    if activation == "gelu" and config.bias_activation_fusion and not config.use_te_activation_func:
        activation = "gelu_tanh"  # megatron's MLP then runs its fused GeLU: the tanh approximation
    fields = dict(
        vocab_size=vocab_size, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_layers=config.num_layers, layer_pattern=config.layer_pattern or f"full*{config.num_layers}",
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads, kv_channels=config.kv_channels,
        softmax_scale=config.softmax_scale,
        normalization=config.normalization, layernorm_epsilon=config.layernorm_epsilon,
        qk_layernorm=config.qk_layernorm, gated_linear_unit=config.gated_linear_unit, activation=activation,
        add_bias_linear=config.add_bias_linear, add_qkv_bias=config.add_qkv_bias,
        position_embedding_type=config.position_embedding_type, rotary_base=config.rotary_base,
        rotary_percent=config.rotary_percent, swa_window_size=config.swa_window_size,
        swa_alibi=bool(getattr(config, "swa_alibi", False)),
        tie_word_embeddings=not config.untie_embeddings_and_output_weights,
    )
    if landmark_token_id is not None:
        fields.update(landmark_token_id=landmark_token_id, vocab_size=max(vocab_size, landmark_token_id + 1))
    if config.num_moe_experts:
        from megatron_ext.models.builder import layer_is_moe

        fields.update(
            num_moe_experts=config.num_moe_experts, moe_ffn_hidden_size=config.moe_ffn_hidden_size,
            moe_router_topk=config.moe_router_topk, moe_router_score_function=config.moe_router_score_function,
            moe_router_pre_softmax=config.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=config.moe_router_topk_scaling_factor,
            moe_router_expert_bias=config.moe_router_enable_expert_bias, moe_router_dtype=config.moe_router_dtype,
            moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
            moe_layers=[plan.index for plan in config.layer_plans if layer_is_moe(config, plan)],
        )
    if config.retrieval_kind in ("hsa", "gca"):  # the chunking, the chunk encoder and the layer's residual
        fields.update(
            hsa_chunk_size=config.hsa_chunk_size, hsa_topk=config.hsa_topk, hsa_qk_norm=config.hsa_qk_norm,
            hsa_bypass_residual=config.hsa_bypass_residual, hsa_encoder_layers=config.hsa_encoder_layers,
            hsa_encoder_num_query_groups=config.encoder_query_groups,
            hsa_encoder_ffn_hidden_size=config.encoder_ffn_size,
        )
    if config.retrieval_kind == "gca":
        fields.update(gca_kv_heads=config.gca_kv_heads, gca_softmax_off_by_one=config.gca_softmax_off_by_one,
                      gca_landmark_null_slot=config.gca_landmark_null_slot)
    if config.retrieval_kind == "hsa":
        fields.update(
            hsa_num_kv_heads=config.hsa_num_kv_heads,
            hsa_retrieval_heads=config.hsa_heads, hsa_retrieval_dim=config.hsa_retrieval_width,
            hsa_weight_rule=config.hsa_weight_rule, hsa_softmax_off_by_one=config.hsa_softmax_off_by_one,
            hsa_rank_decay=config.hsa_rank_decay, hsa_landmark_norm=config.hsa_landmark_norm,
            hsa_inner_swa=config.hsa_inner_swa, hsa_inner_window_size=config.hsa_inner_window_size,
            hsa_encoder_cls=config.hsa_encoder_cls,
        )
    return fields


# megatron's router buffers of load-balancing statistics (training state; the expert bias itself is kept)
_ROUTER_STATISTICS = tuple(f".router.{name}" for name in ("local_tokens_per_expert", "global_tokens_per_expert",
                                                          "ga_steps", "qb_beta", "qb_beta_accum"))


def hf_state_dict(megatron_state: dict, tied: bool, dtype: torch.dtype | None = None,
                  vocab_size: int | None = None) -> dict:
    """The megatron model's state dict as the Hugging Face model's: the same names, without megatron's
    ``_extra_state`` entries (and without the output layer when it is the embedding), contiguous CPU tensors;
    with ``vocab_size``, the embedding and output rows past it (megatron's vocabulary padding) dropped."""
    out = {}
    for name, tensor in megatron_state.items():
        if name.endswith(("_extra_state", *_ROUTER_STATISTICS)) or tensor is None:
            continue
        if tied and name == "output_layer.weight":
            continue
        t = tensor.detach().to("cpu")
        if vocab_size is not None and name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[:vocab_size]
        out[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    return out


def resolve_checkpoint_dir(path: str, iteration: int | None = None) -> str:
    """The iteration directory of a megatron ``--save`` directory (its ``latest_checkpointed_iteration.txt``, or
    ``iteration``; ``release`` where the tracker says so), or ``path`` itself when it already is one."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist: give pretrain_hsa.py's --save directory "
                                f"or one of its iter_* directories")
    name = os.path.basename(os.path.normpath(path))
    if iteration is None and (name.startswith("iter_") or name == "release"):
        return path
    if iteration is None:
        tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
        if not os.path.isfile(tracker):
            raise FileNotFoundError(f"{path} has no latest_checkpointed_iteration.txt: give an iter_* directory, or "
                                    f"--iteration N")
        text = open(tracker).read().strip()
        if text == "release":  # megatron's release checkpoint: <save>/release
            directory = os.path.join(path, "release")
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"{tracker} names the release checkpoint, but {directory} does not exist")
            return directory
        if not text.isdigit():
            raise ValueError(f"{tracker} holds {text!r}, not an iteration number: give --iteration N")
        iteration = int(text)
    directory = os.path.join(path, f"iter_{iteration:07d}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist: no checkpoint of iteration {iteration} in {path}")
    return directory


def _single_rank_args(args: Namespace) -> Namespace:
    """The saved training arguments, for building the whole model on one CPU rank."""
    args = Namespace(**vars(args))
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "expert_model_parallel_size", "expert_tensor_parallel_size"):
        if hasattr(args, name):
            setattr(args, name, 1)
    args.sequence_parallel = False
    args.virtual_pipeline_model_parallel_size = None
    # uneven pipeline stages: megatron checks the per-stage layer counts against the pipeline size (now 1)
    for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                 "pipeline_model_parallel_layout", "num_layers_per_virtual_pipeline_stage",
                 "num_virtual_stages_per_pipeline_rank"):
        if hasattr(args, name):
            setattr(args, name, None)
    for name in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
        if hasattr(args, name):
            setattr(args, name, False)
    args.use_cpu_initialization = True
    args.perform_initialization = False
    # the routed experts as stacked weights (megatron_ext's grouped GEMM, which runs on the CPU), the layout of the
    # Hugging Face model's experts; every expert implementation saves the same checkpoint tensors
    args.moe_experts_impl = "grouped_gemm"
    return args


class MegatronCheckpoint(NamedTuple):
    config: object  # the model's HSAConfig
    padded_vocab_size: int
    state: dict  # the one-rank model's state dict
    landmark_chunk_size: int | None  # --data-landmark-chunk-size of its training data (None: no landmark tokens)
    # the landmark's id as stored (None: no landmarks, or older checkpoints of data that used the default id, the
    # tokenizer's vocabulary size)
    landmark_token_id: int | None


def resolve_landmark(landmark_chunk_size: int | None, landmark_token_id: int | None,
                     vocab_size: int | None) -> int | None:
    """The landmark id to give ``hf_config_fields``: None without landmark data; the stored id; else the default
    id, the tokenizer's vocabulary size (``--vocab-size``), which older checkpoints do not store."""
    if not landmark_chunk_size or landmark_token_id is not None:
        return landmark_token_id
    if vocab_size is None:
        raise ValueError("the checkpoint's data had landmark tokens with the default id, the tokenizer's vocabulary "
                         "size, which the checkpoint does not store: give --vocab-size (the tokenizer's number of "
                         "ids)")
    return vocab_size


def load_megatron_checkpoint(path: str, iteration: int | None = None) -> MegatronCheckpoint:
    """(HSAConfig, padded vocabulary size, model state dict, landmark token id) of a ``pretrain_hsa.py``
    checkpoint, on the CPU.

    Needs megatron-core's parallel state at world size 1 (``megatron_ext.testing.initialize_megatron_parallel`` in
    a one-process world; the CLI sets it up)."""
    from megatron_ext.models import build_model
    from megatron_ext.training.model import transformer_config_from_args

    directory = resolve_checkpoint_dir(path, iteration)
    single = os.path.join(directory, "mp_rank_00", "model_optim_rng.pt")
    # --ckpt-format torch: mp_rank_TT, or mp_rank_TT_PPP under pipeline parallelism
    ranks = [name for name in os.listdir(directory) if name.startswith("mp_rank_")]
    if os.path.isfile(single) or ranks:
        if ranks != ["mp_rank_00"]:
            raise ValueError(f"{directory} is a --ckpt-format torch checkpoint of several model-parallel ranks: "
                             f"re-save it with --ckpt-format torch_dist (which this converter reshards)")
        state = torch.load(single, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("args") is None:
            raise ValueError(f"{single} stores no training arguments: it was not saved by pretrain_hsa.py")
        model_state = state.get("model", state.get("model0"))
        if model_state is None:
            raise ValueError(f"{single} stores no model (no 'model' entry): it was not saved by pretrain_hsa.py")
        args = _single_rank_args(state["args"])
        config = transformer_config_from_args(args)
        model = build_model(config, vocab_size=args.padded_vocab_size)
        model.load_state_dict(model_state, strict=False)
    else:
        from megatron.core import dist_checkpointing

        if not os.path.isfile(os.path.join(directory, "metadata.json")):
            raise FileNotFoundError(f"{directory} is neither a torch_dist checkpoint (metadata.json) nor a torch one "
                                    f"(mp_rank_00/model_optim_rng.pt)")
        common = dist_checkpointing.load_common_state_dict(directory)
        if "args" not in common:
            raise ValueError(f"{directory} stores no training arguments: it was not saved by pretrain_hsa.py")
        args = _single_rank_args(common["args"])
        config = transformer_config_from_args(args)
        model = build_model(config, vocab_size=args.padded_vocab_size)
        key = "model" if "model" in common or getattr(common["args"], "virtual_pipeline_model_parallel_size",
                                                       None) is None else "model0"
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        sharded = model.sharded_state_dict()
        # checked before loading: dist_checkpointing's own error on a missing tensor is a traceback listing every key
        saved = dist_checkpointing.load_tensors_metadata(directory)
        missing = sorted({t.key for t in nested_values(sharded) if isinstance(t, (ShardedTensor, ShardedTensorFactory))
                          and t.key not in saved})
        if missing:
            _lacks(directory, missing)
        loaded = dist_checkpointing.load({key: sharded}, directory)
        model.load_state_dict(loaded[key], strict=False)
    missing = [n for n in model.state_dict() if not n.endswith("_extra_state")
               and n not in (model_state if os.path.isfile(single) else loaded[key])]
    if missing:
        _lacks(directory, missing)
    chunk = getattr(args, "data_landmark_chunk_size", None)
    landmark = getattr(args, "data_landmark_token_id", None) if chunk else None
    return MegatronCheckpoint(config, args.padded_vocab_size, model.state_dict(), chunk,
                              None if landmark is None else int(landmark))


def _lacks(directory: str, missing: list[str]):
    raise ValueError(f"{directory}: the checkpoint lacks {len(missing)} of the model's tensors, e.g. {missing[:3]}")


def save_hf_directory(out_dir: str, fields: dict, state: dict, tokenizer_files: tuple[str, ...] = ()) -> None:
    """Write a Hugging Face model directory: config.json (with ``auto_map`` to the model code copied beside it),
    model.safetensors, and the given tokenizer files."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    config = dict(fields, model_type="megatron_hsa_gpt", architectures=["HSAGPTForCausalLM"],
                  auto_map={"AutoConfig": "configuration_hsa_gpt.HSAGPTConfig",
                            "AutoModelForCausalLM": "modeling_hsa_gpt.HSAGPTForCausalLM"},
                  torch_dtype=str(next(iter(state.values())).dtype).replace("torch.", ""))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in MODEL_FILES:
        shutil.copy(os.path.join(HERE, name), os.path.join(out_dir, name))
    for path in tokenizer_files:
        shutil.copy(path, os.path.join(out_dir, os.path.basename(path)))
