"""pretrain_hsa.py's arguments: Megatron-LM's parser + the HSA/GCA group + ``--config FILE.yaml`` with overrides."""

import glob
import os
import sys

import pytest

from megatron_ext.training import arguments


def _parse(monkeypatch, argv):
    from megatron.training.arguments import parse_args

    monkeypatch.setattr(sys, "argv", ["pretrain_hsa.py", *argv])
    return parse_args(extra_args_provider=arguments.add_hsa_arguments)


def test_yaml_sets_defaults_and_command_line_wins(monkeypatch, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model:\n  num-layers: 4\n  hidden_size: 128\n  layer_pattern: 'swa*3 hsa'\n  hsa_topk: 4\n"
        "  hsa_bypass_residual: false\n  num_query_groups: 2\n"
        "training:\n  lr: 2.0e-3\n  no-rope-fusion: true\n  use-distributed-optimizer: true\n"
        "  eval-iters: 7\n"
    )
    args = _parse(monkeypatch, ["--config", str(cfg), "--hsa-topk", "16", "--eval-iters", "3"])
    assert (args.num_layers, args.hidden_size, args.lr) == (4, 128, 2e-3)
    assert args.layer_pattern == "swa*3 hsa"
    assert args.hsa_topk == 16 and args.eval_iters == 3, "the command line overrides the file"
    assert args.hsa_bypass_residual is False and args.apply_rope_fusion is False
    assert args.use_distributed_optimizer is True
    assert args.group_query_attention is True and args.num_query_groups == 2


EXAMPLE_CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "*.yaml")))


@pytest.mark.parametrize("config", EXAMPLE_CONFIGS, ids=os.path.basename)
def test_every_example_config_passes_megatron_validation(monkeypatch, config):
    """What ``pretrain_hsa.py --config FILE --mock-data`` does before building anything: parse, then megatron's
    ``validate_args`` (the two halves of ``parse_and_validate_args``; the third only sets globals)."""
    import torch
    from megatron.training.arguments import validate_args

    # The example models are H100 configurations; validation asks the GPU's capability for --moe-grouped-gemm.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    args = _parse(monkeypatch, ["--config", config, "--mock-data", "--micro-batch-size", "1",
                                "--global-batch-size", "8", "--train-iters", "10"])
    validate_args(args, dict(arguments.ARGS_DEFAULTS))
    assert args.max_position_embeddings >= args.seq_length


def test_max_position_embeddings_defaults_to_seq_length(monkeypatch):
    assert _parse(monkeypatch, ["--seq-length", "4096"]).max_position_embeddings == 4096
    given = _parse(monkeypatch, ["--seq-length", "4096", "--max-position-embeddings", "8192"])
    assert given.max_position_embeddings == 8192, "an explicit value is kept"


def test_megatron_flags_keep_their_names(monkeypatch):
    args = _parse(monkeypatch, [
        "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--num-experts", "8",
        "--seq-length", "8192", "--micro-batch-size", "1", "--global-batch-size", "64", "--lr-decay-style",
        "cosine", "--lr-warmup-iters", "100", "--min-lr", "1e-5", "--attention-pattern", "swa hsa",
        "--no-hsa-qk-norm", "--hsa-gumbel-noise",
    ])
    assert (args.tensor_model_parallel_size, args.expert_model_parallel_size, args.num_experts) == (2, 2, 8)
    assert (args.seq_length, args.global_batch_size, args.lr_decay_style) == (8192, 64, "cosine")
    assert args.layer_pattern == "swa hsa"  # --attention-pattern is an alias of --layer-pattern
    assert args.hsa_qk_norm is False and args.hsa_gumbel_noise is True


def test_every_hsa_config_field_has_a_flag(monkeypatch):
    args = _parse(monkeypatch, [])
    for field in arguments._hsa_config_fields():  # noqa: SLF001
        assert hasattr(args, field.name), f"HSAConfig.{field.name} cannot be set from the command line"
    assert not hasattr(args, "layer_recompute_method")  # derived from --recompute-granularity full, not a flag


@pytest.mark.parametrize("text, message", [
    ("hsa_top_k: 4\n", "unknown argument 'hsa_top_k'"),
    ("use-distributed-optimizer: 1\n", "is a switch"),
    ("- a\n- b\n", "expected a mapping"),
    ("model:\n  lr: 1.0\ntraining:\n  lr: 2.0\n", "'lr' is set twice"),
    ("eval-iters: [1, 2]\n", "takes one value"),
    ("lr: fast\n", "'lr' takes a float, not 'fast'"),
])
def test_bad_yaml_is_named(monkeypatch, tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        _parse(monkeypatch, ["--config", str(cfg)])
    text = str(exit_info.value.code)
    assert text.startswith(f"--config {cfg}: ") and message in text and "\n" not in text, "one line, no traceback"


def test_help_lists_the_hsa_group(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(monkeypatch, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "HSA / GCA / SWA" in text and "--hsa-topk" in text and "--no-hsa-bypass-residual" in text


def test_missing_config_file_is_one_line_naming_it(monkeypatch, tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SystemExit) as exit_info:
        _parse(monkeypatch, ["--config", str(missing)])
    message = str(exit_info.value.code)
    assert message.startswith(f"--config {missing}: ") and "\n" not in message


def test_the_last_config_flag_wins_as_for_any_flag(monkeypatch, tmp_path):
    """Two ``--config`` flags (a base file, then a run's file): argparse keeps the last, so must the values."""
    base, run = tmp_path / "base.yaml", tmp_path / "run.yaml"
    base.write_text("hidden_size: 128\n")
    run.write_text("hidden_size: 256\n")
    args = _parse(monkeypatch, ["--config", str(base), f"--config={run}"])
    assert (args.config, args.hidden_size) == (str(run), 256)


def test_entry_point_docstring_names_files_that_exist():
    import os
    import re

    from tests.training.runner import REPO, SCRIPT

    text = open(SCRIPT).read().split('"""')[1]
    paths = re.findall(r"\b((?:examples|megatron_ext)/[\w./-]+\.(?:yaml|py))", text)
    assert paths, "the docstring shows how to run an example"
    for path in paths:
        assert os.path.exists(os.path.join(REPO, path)), f"pretrain_hsa.py's docstring names missing {path}"


@pytest.mark.parametrize("argv, message", [
    (["--train-iters", "2", "--lr-warmup-iters", "2"], "--lr-warmup-iters 2 leaves no LR decay"),
    (["--train-iters", "100", "--lr-decay-iters", "10", "--lr-warmup-iters", "10"], "10 decay iterations (--lr-decay-iters)"),
    (["--train-iters", "10", "--lr-warmup-fraction", "1.0"], "--lr-warmup-fraction 1.0 leaves no LR decay"),
])
def test_warmup_that_outlasts_the_decay_is_one_line_at_parse_time(monkeypatch, argv, message):
    # megatron-core would build the model and optimizer, then fail on a bare assert in OptimizerParamScheduler
    with pytest.raises(SystemExit) as exit_info:
        _parse(monkeypatch, argv)
    assert message in str(exit_info.value)
    assert _parse(monkeypatch, ["--train-iters", "3", "--lr-warmup-iters", "2"]).lr_warmup_iters == 2


@pytest.mark.parametrize("keep", ["0", "-2"])
def test_keeping_no_checkpoint_is_refused(monkeypatch, keep):
    # 0 or less used to keep every checkpoint, the opposite of what it reads as
    with pytest.raises(SystemExit) as exit_info:
        _parse(monkeypatch, ["--keep-last-checkpoints", keep])
    assert f"--keep-last-checkpoints {keep}: keep at least 1" in str(exit_info.value)
    assert _parse(monkeypatch, ["--keep-last-checkpoints", "1"]).keep_last_checkpoints == 1


def test_evaluation_only_runs_keep_any_lr_schedule(monkeypatch):
    # --skip-train builds no optimizer and no LR scheduler: megatron skips its LR checks ("LR config is irrelevant"),
    # so an evaluation run of a training command line must parse whatever its warm-up
    args = _parse(monkeypatch, ["--skip-train", "--train-iters", "2", "--lr-warmup-iters", "5"])
    assert args.skip_train and args.lr_warmup_iters == 5


def test_zero_lr_decay_iterations_is_one_line_at_parse_time(monkeypatch):
    # megatron keeps an explicit --lr-decay-iters 0 (only None falls back to --train-iters) and then fails on a bare
    # assert (lr_decay_steps > 0) once the model and optimizer are built
    with pytest.raises(SystemExit) as exit_info:
        _parse(monkeypatch, ["--train-iters", "10", "--lr-decay-iters", "0"])
    assert "the 0 decay iterations (--lr-decay-iters)" in str(exit_info.value)
