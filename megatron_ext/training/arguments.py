"""Command-line arguments of ``pretrain_hsa.py``: Megatron-LM's flags, one HSA/GCA group, and ``--config FILE.yaml``.

Megatron-LM's parser (``megatron.training.arguments``) defines every standard flag; :func:`add_hsa_arguments` is its
``extra_args_provider`` and adds

* one argument group, "HSA / GCA / SWA", whose flags share the ``--hsa-``, ``--gca-`` and ``--swa-`` prefixes
  (plus ``--attention-pattern``, the per-layer attention kinds);
* ``--config FILE``: a YAML mapping of argument names (``seq-length`` or ``seq_length``) to values, applied as
  parser defaults, so that anything given on the command line wins;
* defaults that make the stock Megatron-LM command line run without Transformer Engine, apex or a GPU: the fused
  kernels that need them are switched off, the local (non-TE) layer implementation is chosen, and the process group
  uses gloo on the CPU. Each such default can still be overridden explicitly.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import yaml

from megatron_ext.compat.optional import apex_available, te_available

# Passed to ``parse_and_validate_args``: only applied when an argument is still None after parsing.
ARGS_DEFAULTS: dict[str, Any] = {"tokenizer_type": "NullTokenizer"}

ATTENTION_KINDS_HELP = "swa, full, hsa, gca"


def environment_defaults() -> dict[str, Any]:
    """Defaults (by argparse ``dest``) that let Megatron-LM's stock command line run in this environment.

    Megatron-LM's CLI turns on four fused kernels by default; each one needs apex or Transformer Engine and fails at
    build or first forward without them (megatron_core_notes.md, H100 appendix, obstacles 2-5).
    """
    defaults: dict[str, Any] = {}
    have_te = te_available()
    have_apex = apex_available()
    if not have_te:
        defaults["apply_rope_fusion"] = False  # --no-rope-fusion: fused RoPE is a TE kernel
        defaults["transformer_impl"] = "local"
    if not (have_te or have_apex):
        defaults["no_persist_layer_norm"] = True  # --no-persist-layer-norm: apex's persistent LayerNorm
    if not have_apex:
        defaults["gradient_accumulation_fusion"] = False  # --no-gradient-accumulation-fusion: apex kernel
        defaults["masked_softmax_fusion"] = False  # --no-masked-softmax-fusion: apex kernel
    if not torch.cuda.is_available():
        defaults["distributed_backend"] = "gloo"
    return defaults


def _hsa_config_fields():
    """HSAConfig's own fields (those TransformerConfig lacks) but for those it derives from others: the source of
    truth for the HSA/GCA/SWA flags."""
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    from megatron_ext.models import HSAConfig

    base = {f.name for f in dataclasses.fields(TransformerConfig)}
    return [f for f in dataclasses.fields(HSAConfig) if f.name not in base and not f.metadata.get("derived")]


def _field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field (``x: int = 1`` then ``\"\"\"what x is\"\"\"``)."""
    import ast
    import inspect
    import textwrap

    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError, IndexError):
        return {}
    docs = {}
    for stmt, following in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant)
                and isinstance(following.value.value, str)):
            docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


_FIELD_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
                "Optional[str]": str}


def _add_hsa_config_flags(group, parser: argparse.ArgumentParser) -> None:
    """One flag per HSAConfig field not already a Megatron-LM flag: ``hsa_topk`` -> ``--hsa-topk``;
    a boolean field that defaults to True gets ``--no-<name>`` (Megatron-LM's convention)."""
    from megatron_ext.models import HSAConfig

    existing = set(parser._option_string_actions)  # noqa: SLF001 - argparse has no public lookup
    docs = _field_docs(HSAConfig)
    for field in _hsa_config_fields():
        flag = "--" + field.name.replace("_", "-")
        if flag in existing or field.name in ("vocab_size",):
            continue  # a Megatron-LM flag already sets this field (seq_length, rotary_base, ...)
        doc = docs.get(field.name, f"HSAConfig.{field.name}.")
        default = field.default
        if field.type in ("bool", bool):
            if default:
                group.add_argument("--no-" + flag[2:], dest=field.name, action="store_false",
                                   help=f"Turn off: {doc}")
            else:
                group.add_argument(flag, dest=field.name, action="store_true", help=doc)
            continue
        kind = _FIELD_TYPES.get(str(field.type))
        if kind is None:
            continue  # structured fields are set through --config only
        names = [flag] + (["--attention-pattern"] if field.name == "layer_pattern" else [])
        group.add_argument(*names, dest=field.name, type=kind, default=default, help=f"{doc} (default: {default})")


def add_hsa_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``extra_args_provider`` for ``megatron.training``: the HSA/GCA/SWA group, ``--config``, environment defaults."""
    group = parser.add_argument_group(
        "HSA / GCA / SWA", "sparse long-context attention (megatron_ext.models.HSAConfig): --layer-pattern "
        f"(kinds {ATTENTION_KINDS_HELP}, e.g. 'swa*8 [hsa swa*4]*2'), --swa-*, --hsa-*, --gca-*")
    group.add_argument("--config", type=str, default=None, metavar="FILE",
                       help="YAML file of argument values (keys are flag names with - or _, optionally under "
                            "'model:', 'training:' or 'data:' sections); the command line overrides them.")
    _add_hsa_config_flags(group, parser)
    from megatron_ext.data.provider import add_data_args

    add_data_args(parser)  # --data-pack-chunk-size (HSA packing), --data-landmark-chunk-size (GCA), ...
    group.add_argument("--keep-last-checkpoints", type=int, default=None, metavar="K",
                       help="After each complete save keep only the newest K iter_* checkpoints in --save.")
    group.add_argument("--no-torch-fused-adam", dest="torch_fused_adam", action="store_false",
                       help="Keep megatron's torch AdamW fallback (foreach) when neither apex nor Transformer Engine "
                            "is installed; by default it is switched to torch's fused AdamW on GPUs (same update, "
                            "one pass over the optimizer state).")
    group.add_argument("--peak-tflops", type=float, default=None,
                       help="Peak dense TFLOP/s per device for MFU (default: NVIDIA's bf16 peak of the GPU: "
                            "989.4 H100 SXM and H200, 835 H100 NVL, 756 H100 PCIe; other devices need this flag "
                            "for MFU).")

    _escape_bare_percent_signs(parser)
    defaults = environment_defaults()
    # The attention layers mask causally (and by document, from cu_seqlens) themselves: no dense [s, s] masks,
    # which are unaffordable at long context (Megatron-LM's default builds one per sample).
    defaults["create_attention_mask_in_dataloader"] = False
    # Preemption (SIGTERM, SIGUSR1, a first Ctrl-C) saves a checkpoint and exits cleanly
    # (megatron_ext.training.runtime).
    defaults["exit_signal_handler"] = True
    config_path = _config_path_from_argv(sys.argv[1:])
    if config_path is not None:
        defaults.update(load_yaml_config(config_path, parser))
    parser.set_defaults(**defaults)
    _fill_derived_defaults_after_parsing(parser)
    return parser


def _fill_derived_defaults_after_parsing(parser: argparse.ArgumentParser) -> None:
    """After parsing (before megatron's validation), default ``--max-position-embeddings`` to ``--seq-length``.

    megatron requires the flag, but with RoPE (every example model) it only sizes the position table; the model
    builder already falls back to ``seq_length``. A parser default cannot depend on another flag, so the fill-in
    happens on the parsed namespace; ``parse_args`` goes through ``parse_known_args``, so both are covered.
    """
    parse_known_args = parser.parse_known_args

    def parse_known_args_filling_defaults(*args, **kwargs):
        namespace, extras = parse_known_args(*args, **kwargs)
        if getattr(namespace, "max_position_embeddings", None) is None:
            namespace.max_position_embeddings = getattr(namespace, "seq_length", None)
        _check_lr_schedule(namespace)
        keep = getattr(namespace, "keep_last_checkpoints", None)
        if keep is not None and keep < 1:
            raise SystemExit(f"--keep-last-checkpoints {keep}: keep at least 1 (the checkpoint just saved); leave "
                             f"the flag out to keep every checkpoint")
        return namespace, extras

    parser.parse_known_args = parse_known_args_filling_defaults


def _check_lr_schedule(args) -> None:
    """Warm-up must end before the LR decay does: megatron-core checks it with a bare ``assert`` only once the model
    and optimizer are built. Iteration-based schedules (``--train-iters``) are checked here, at parse time.
    ``--skip-train`` builds no scheduler (megatron skips its LR checks then): nothing to check."""
    train_iters = getattr(args, "train_iters", None)
    if not train_iters or getattr(args, "skip_train", False):
        return
    given_decay = getattr(args, "lr_decay_iters", None)
    decay = train_iters if given_decay is None else given_decay  # as megatron: only None falls back
    fraction = getattr(args, "lr_warmup_fraction", None)
    warmup = fraction * decay if fraction is not None else (getattr(args, "lr_warmup_iters", 0) or 0)
    if warmup >= decay:
        given = f"--lr-warmup-fraction {fraction}" if fraction is not None else f"--lr-warmup-iters {warmup}"
        source = "--train-iters" if given_decay is None else "--lr-decay-iters"
        raise SystemExit(f"{given} leaves no LR decay: the warm-up must end before the {decay} decay iterations "
                         f"({source}); use fewer warm-up iterations or more {source}")


def _escape_bare_percent_signs(parser: argparse.ArgumentParser) -> None:
    """Make ``--help`` work: argparse %-formats help strings, and megatron-core 0.19.2 has one with a bare '%'
    (``--moe-paged-stash-buffer-size-factor-cuda``: "10%)"), which makes ``--help`` crash."""
    import re

    for action in parser._actions:  # noqa: SLF001
        if action.help and "%" in action.help:
            action.help = re.sub(r"%%|%(?!\()", "%%", action.help)  # keep '%%' and '%(name)s', double the rest


def _config_path_from_argv(argv: list[str]) -> str | None:
    """The last ``--config`` given: argparse keeps the last value of a repeated flag, so ``args.config`` names it."""
    path = None
    for i, token in enumerate(argv):
        if token == "--config":
            if i + 1 >= len(argv):
                raise SystemExit("--config needs a file name: --config examples/model.yaml")
            path = argv[i + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
    return path


def _name_index(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, bool]]:
    """name -> (action, named by its flag): ``no_rope_fusion`` (the flag) and ``apply_rope_fusion`` (the dest)."""
    index: dict[str, tuple[argparse.Action, bool]] = {}
    for action in parser._actions:  # noqa: SLF001 - argparse exposes no public list of actions
        for option in action.option_strings:
            index.setdefault(option.lstrip("-").replace("-", "_"), (action, True))
    for action in parser._actions:  # noqa: SLF001
        index.setdefault(action.dest, (action, False))
    return index


_SECTIONS = ("model", "training", "data", "checkpointing", "logging")


def _flatten(raw: dict, path: str) -> dict:
    flat: dict = {}
    for key, value in raw.items():
        if str(key) in _SECTIONS and isinstance(value, dict):
            for inner_key, inner_value in _flatten(value, path).items():
                if inner_key in flat:
                    raise SystemExit(f"--config {path}: '{inner_key}' is set twice")
                flat[inner_key] = inner_value
        else:
            if key in flat:
                raise SystemExit(f"--config {path}: '{key}' is set twice")
            flat[key] = value
    return flat


def load_yaml_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML mapping of flag names to values; return parser defaults keyed by ``dest``.

    Keys are flag names without dashes (``seq-length``, ``seq_length``; a ``no-`` flag such as
    ``no-rope-fusion: true`` works as on the command line) or argument destinations (``apply_rope_fusion: false``),
    at the top level or under ``model:``/``training:``/``data:`` sections. Unknown keys are an error naming the key.
    Errors are one line (``SystemExit`` with the message), as argparse reports a bad flag: no traceback.
    """
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:  # argument parsing: a one-line message, as for a missing --config value
        raise SystemExit(f"--config {path}: cannot read the file ({e.strerror}); give the path of a YAML file, "
                         f"e.g. --config examples/swa_hsa_345m.yaml") from None
    if not isinstance(raw, dict):
        raise SystemExit(f"--config {path}: expected a mapping of argument names to values, "
                         f"got {type(raw).__name__}")
    index = _name_index(parser)
    defaults: dict[str, Any] = {}
    for key, value in _flatten(raw, path).items():
        name = str(key).lstrip("-").replace("-", "_")
        action, by_flag = index.get(name, (None, False))
        if action is None:
            raise SystemExit(f"--config {path}: unknown argument '{key}' (not a flag of pretrain_hsa.py; "
                             f"see `python pretrain_hsa.py --help`)")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
            if not isinstance(value, bool):
                raise SystemExit(f"--config {path}: '{key}' is a switch; give true or false, not {value!r}")
            # By its flag (``no_rope_fusion: true``) a switch means "as if given on the command line"; by its
            # destination (``apply_rope_fusion: false``) the value is the value.
            if by_flag and isinstance(action, argparse._StoreFalseAction):  # noqa: SLF001
                value = not value
        elif isinstance(value, list) and action.nargs is None:
            raise SystemExit(f"--config {path}: '{key}' takes one value, got a list")
        elif action.type is not None and value is not None:
            try:
                value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
            except (TypeError, ValueError):
                raise SystemExit(f"--config {path}: '{key}' takes a {getattr(action.type, '__name__', 'value')}, "
                                 f"not {value!r}") from None
        defaults[action.dest] = value
    if defaults.get("num_query_groups") is not None and "group_query_attention" not in defaults:
        # Model files (examples/*.yaml) give num_query_groups alone; Megatron-LM reads it only with this switch.
        defaults["group_query_attention"] = True
    return defaults
