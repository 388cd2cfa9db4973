"""Resuming at another parallel layout: what megatron-core cannot load is refused up front, with the fixes named.

One real checkpoint (pretrain_hsa.py, one rank, a tiny MoE, torch_dist with megatron's default dp_reshardable
distributed-optimizer state) is checked against the layouts a user would resume at. What megatron-core does at each
was measured with 0.19.2 (2 gloo ranks, ``tests/parallel/test_gpu_pretrain_layouts.py`` on GPUs): TP or PP changed
-> "(TP, PP) mismatch ... use --ckpt-fully-parallel-save" (a deprecated flag that changes nothing); EP 2 -> "Expected
2 entries in state dict, but got 4"; DP or CP changed -> loads; any layout with --no-load-optim -> loads.
"""

from __future__ import annotations

import os
import types

import pytest

from megatron_ext.training import checkpointing
from tests.training.runner import TINY_SWA_HSA, run

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall"]
ARGS = TINY_SWA_HSA + MOE + ["--vocab-size", "256", "--train-iters", "2", "--hidden-dropout", "0",
                             "--attention-dropout", "0", "--lr-warmup-iters", "0"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("resume_layout") / "ckpt")
    run(ARGS + ["--save", path, "--save-interval", "1", "--exit-interval", "1"]).check()
    return path


def _args(load, tp=1, pp=1, ep=1, etp=None, **extra):
    values = dict(load=load, ckpt_step=None, no_load_optim=False, finetune=False, num_experts=4,
                  use_distributed_optimizer=True, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                  expert_model_parallel_size=ep, expert_tensor_parallel_size=etp or tp)
    values.update(extra)
    return types.SimpleNamespace(**values)


def test_same_layout_and_layouts_megatron_can_load_pass(saved):
    assert checkpointing.resume_layout_problem(_args(saved)) is None
    # weights alone reshard to any layout
    for layout in (dict(tp=2), dict(pp=2), dict(ep=2), dict(tp=2, etp=1)):
        assert checkpointing.resume_layout_problem(_args(saved, no_load_optim=True, **layout)) is None
        assert checkpointing.resume_layout_problem(_args(saved, finetune=True, **layout)) is None
    # nothing to resume
    assert checkpointing.resume_layout_problem(_args(None, tp=2)) is None
    assert checkpointing.resume_layout_problem(_args(os.path.dirname(saved) + "/none", tp=2)) is None


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2)])
def test_dp_reshardable_optimizer_state_at_another_tp_or_pp_is_refused(saved, layout):
    problem = checkpointing.resume_layout_problem(_args(saved, **layout))
    assert "dp_reshardable" in problem and "TP 1, PP 1, EP 1" in problem
    assert "--dist-ckpt-optim-fully-reshardable" in problem and "--no-load-optim" in problem


@pytest.mark.parametrize("layout", [dict(ep=2), dict(tp=2, etp=1)])
def test_experts_moving_to_their_own_optimizer_is_refused(saved, layout):
    problem = checkpointing.resume_layout_problem(_args(saved, **layout))
    assert "expert weights in the same optimizer as the other weights" in problem
    assert "in an optimizer of their own" in problem and "--no-load-optim" in problem


def test_fully_reshardable_state_changes_tp_and_pp_but_not_the_expert_optimizer(saved, monkeypatch):
    from megatron.core import dist_checkpointing

    load = dist_checkpointing.load_common_state_dict

    def fully_reshardable(path):
        common = load(path)
        common["content_metadata"] = dict(common["content_metadata"], distrib_optim_sharding_type="fully_reshardable")
        return common

    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", fully_reshardable)
    assert checkpointing.resume_layout_problem(_args(saved, tp=2, pp=2)) is None
    assert "optimizer of their own" in checkpointing.resume_layout_problem(_args(saved, ep=2))


def test_legacy_torch_checkpoints_load_only_at_their_layout(tmp_path):
    iteration = tmp_path / "iter_0000003"
    (iteration / "mp_rank_00").mkdir(parents=True)
    (tmp_path / checkpointing.TRACKER_NAME).write_text("3")
    assert checkpointing.resume_layout_problem(_args(str(tmp_path), no_load_optim=True)) is None
    problem = checkpointing.resume_layout_problem(_args(str(tmp_path), tp=2, no_load_optim=True))
    assert "--ckpt-format torch" in problem and "mp_rank_00" in problem and "TP 2" in problem
    (iteration / "mp_rank_01").mkdir()
    assert checkpointing.resume_layout_problem(_args(str(tmp_path), tp=2)) is None


def test_pretrain_refuses_the_resume_in_one_line_before_building_anything(saved, tmp_path):
    result = run(ARGS + ["--load", saved, "--tensor-model-parallel-size", "2", "--sequence-parallel"], nproc=2)
    assert result.returncode != 0
    assert result.output.count("pretrain_hsa.py: cannot resume:") == 1, result.output[-4000:]
    assert "--dist-ckpt-optim-fully-reshardable" in result.output
    assert "building GPT" not in result.output  # stopped before megatron built (and loaded into) anything
    assert checkpointing.read_latest_iteration(saved) == 1
