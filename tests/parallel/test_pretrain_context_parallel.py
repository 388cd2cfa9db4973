"""pretrain_hsa.py (megatron.training's loop) at CP=2 continues a one-rank checkpoint exactly like one rank does.

The driver's own initialisation is not layout-independent (megatron seeds per stage), so both runs start from the
same saved iteration: one rank trains iteration 1 and saves; then one rank and a CP=2 world each resume and train
iterations 2-3. Losses and grad norms (as megatron logs them) must agree. This covers the driver's CP batch split
(megatron's layout, which its RoPE assumes), the CP chunk memory and SWA gathers, and the checkpoint load.
"""

import shutil

from tests.training.runner import TINY_SWA_HSA, finish, start

ARGS = TINY_SWA_HSA + ["--train-iters", "3", "--hidden-dropout", "0", "--attention-dropout", "0"]


def test_cp2_resume_matches_one_rank(tmp_path):
    first = tmp_path / "first"
    saved = finish(start(ARGS + ["--save", str(first), "--save-interval", "1", "--exit-interval", "1"])).check()
    assert list(saved.losses()) == [1]
    runs = {}
    for name, extra, nproc in [("one", [], 1), ("cp2", ["--context-parallel-size", "2"], 2)]:
        ckpt = tmp_path / name
        shutil.copytree(first, ckpt)
        runs[name] = finish(start(ARGS + extra + ["--load", str(ckpt), "--save", str(ckpt), "--save-interval", "100"],
                                  nproc=nproc), timeout=600).check()
    assert list(runs["one"].losses()) == [2, 3]
    assert runs["cp2"].losses() == runs["one"].losses()
    assert runs["cp2"].grad_norms() == runs["one"].grad_norms()
