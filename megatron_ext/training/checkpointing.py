"""Crash-safe checkpoints for ``pretrain_hsa.py`` on top of megatron's ``save_checkpoint``.

megatron writes ``--save/iter_NNNNNNN/`` (``torch_dist``: every rank's shards plus metadata), waits for every rank
(barrier), and only then records the iteration in ``--save/latest_checkpointed_iteration.txt`` (the "latest"
marker ``--load`` reads). Two gaps remain, closed here:

* the marker is rewritten in place (``open(..., 'w')``): a process killed during that write leaves an empty or
  partial marker and no loadable "latest". :func:`install` makes that one write atomic: the text goes to a
  temporary file in the same directory, is flushed and fsynced, then ``os.replace``-d over the marker, and the
  directory is fsynced. The marker therefore always names a checkpoint that was complete when it was written, and a
  process killed at any point of a save leaves the previous checkpoint loadable and the marker pointing at it.
* a save killed half-way leaves a partial ``iter_N/``; a later save of the same iteration (after resuming from an
  earlier checkpoint) would write into it. Before each save, an ``iter_N/`` that the marker does not name is
  removed.

``--keep-last-checkpoints K`` prunes older ``iter_*`` directories right after the marker moves to a new checkpoint
(never the one it names). The atomic write goes through megatron's own storage shim (``maybe_msc``) for local paths
only; object-store paths are left to it.

Speed: the ``torch_dist`` writer hands its results back through a queue that megatron creates, on the first save of a
process, as a ``multiprocessing`` *spawn* Manager: a fresh Python process that re-imports the training script and
megatron (4-20 s, the "slow first save" of megatron_core_notes.md). A synchronous save (no ``--async-save``) only
passes results between threads of this process, so :func:`install` gives it a plain ``queue.Queue`` instead.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

TRACKER_NAME = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_STATE = {"installed": False, "keep_last": None}


def read_latest_iteration(save_dir: str) -> int | None:
    """The iteration the ``latest`` marker of ``save_dir`` names (None: no marker, or 'release')."""
    path = os.path.join(save_dir, TRACKER_NAME)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    return int(text) if text.isdigit() else None


def checkpoint_iterations(save_dir: str) -> list[int]:
    """Iterations of the ``iter_*`` directories in ``save_dir``, ascending (complete or not)."""
    if not os.path.isdir(save_dir):
        return []
    found = [_ITER_DIR.match(name) for name in os.listdir(save_dir)]
    return sorted(int(m.group(1)) for m in found if m)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` so that readers see the old or the new content, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def prune_checkpoints(save_dir: str, keep_last: int) -> list[int]:
    """Delete all but the newest ``keep_last`` ``iter_*`` directories (never the one ``latest`` names)."""
    if keep_last is None or keep_last < 1:
        return []
    latest = read_latest_iteration(save_dir)
    iterations = [i for i in checkpoint_iterations(save_dir) if latest is None or i <= latest]
    doomed = [i for i in iterations[:-keep_last] if i != latest]
    for iteration in doomed:
        shutil.rmtree(os.path.join(save_dir, f"iter_{iteration:07d}"), ignore_errors=True)
    return doomed


class _AtomicTrackerFile:
    """File object for megatron's ``open(tracker, 'w')``: buffers the text, publishes it atomically on close."""

    def __init__(self, path: str):
        self.path = path
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def close(self) -> None:
        write_atomic(self.path, "".join(self.parts))
        prune_checkpoints(os.path.dirname(os.path.abspath(self.path)), _STATE["keep_last"])

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        return False


class _StorageShim:
    """megatron's ``maybe_msc`` with one change: writing a local ``latest`` marker is atomic."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def open(self, path, mode="r", *args, **kwargs):
        if ("w" in mode and isinstance(path, (str, os.PathLike)) and os.path.basename(str(path)) == TRACKER_NAME
                and "://" not in str(path)):
            return _AtomicTrackerFile(str(path))
        return self._inner.open(path, mode, *args, **kwargs)


def _remove_stale_iteration_dir(save_dir: str, iteration: int) -> None:
    """Rank 0 removes ``iter_<iteration>/`` left by a save that never completed (the marker does not name it)."""
    import torch

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    path = os.path.join(save_dir, f"iter_{iteration:07d}")
    if rank0 and os.path.isdir(path) and read_latest_iteration(save_dir) != iteration:
        shutil.rmtree(path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def install(keep_last: int | None = None, async_save: bool = False) -> None:
    """Make megatron's checkpoint saves crash-safe (see the module docstring); idempotent."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.training import checkpointing as megatron_checkpointing
    from megatron.training import training as megatron_training

    _STATE["keep_last"] = keep_last
    if _STATE["installed"]:
        return
    if not async_save and filesystem_async._results_queue is None:  # noqa: SLF001 - megatron's module-level queue
        filesystem_async._results_queue = queue.Queue()  # noqa: SLF001 - threads of this process only (see above)
    megatron_checkpointing.maybe_msc = _StorageShim(megatron_checkpointing.maybe_msc)
    original_save = megatron_checkpointing.save_checkpoint

    def save_checkpoint(iteration, *args, **kwargs):
        from megatron.training import get_args

        save_dir = get_args().save
        if save_dir and "://" not in save_dir and not kwargs.get("non_persistent_ckpt", False):
            _remove_stale_iteration_dir(save_dir, int(iteration))
        return original_save(iteration, *args, **kwargs)

    megatron_checkpointing.save_checkpoint = save_checkpoint
    megatron_training.save_checkpoint = save_checkpoint
    _STATE["installed"] = True


# --------------------------------------------------------------------------------------------------------------
# Resuming at another parallel layout
#
# torch_dist checkpoints reshard the *weights* to any TP/PP/EP/CP layout at load. megatron-core cannot always do the
# same for the optimizer state, and then fails deep inside the load with messages that do not lead to a fix
# (measured with 0.19.2): a distributed optimizer saved in its default ``dp_reshardable`` format at another (TP, PP)
# says to add ``--ckpt-fully-parallel-save`` (deprecated, and it changes nothing); at another EP it fails with a
# ``KeyError`` listing every key of the checkpoint; and when the expert parameters move in or out of their own
# optimizer (EP > 1 or an expert TP size of its own puts them there) the load stops at "Expected 2 entries in state
# dict, but got 4". :func:`check_resume_layout` finds these cases before anything is built, from the checkpoint's
# saved arguments, and names the fixes.

def _layout(args) -> dict[str, int]:
    """The parallel sizes of megatron arguments: this run's, or those saved in a checkpoint."""
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    return {
        "TP": tp,
        "PP": getattr(args, "pipeline_model_parallel_size", 1) or 1,
        "EP": getattr(args, "expert_model_parallel_size", 1) or 1,
        "expert TP": getattr(args, "expert_tensor_parallel_size", None) or tp,
    }


def _layout_text(layout: dict[str, int]) -> str:
    return ", ".join(f"{name} {size}" for name, size in layout.items())


def _experts_in_own_optimizer(args) -> bool:
    """megatron-core gives the expert weights their own optimizer (and DP group) exactly when this holds."""
    if not getattr(args, "num_experts", None):
        return False
    layout = _layout(args)
    return layout["EP"] > 1 or layout["expert TP"] != layout["TP"]


def _checkpoint_to_load(args) -> str | None:
    """The ``iter_N`` directory that ``--load`` (and ``--ckpt-step``) would resume from, if any (not 'release')."""
    load = getattr(args, "load", None)
    if not load or "://" in load or not os.path.isdir(load):
        return None
    iteration = getattr(args, "ckpt_step", None)
    if iteration is None:
        iteration = read_latest_iteration(load)
    path = None if iteration is None else os.path.join(load, f"iter_{int(iteration):07d}")
    return path if path and os.path.isdir(path) else None


def _legacy_rank_dirs(layout: dict[str, int]) -> set[str]:
    """The ``mp_rank_*`` directories megatron's ``--ckpt-format torch`` reads at ``layout``."""
    from megatron.training.checkpointing import get_checkpoint_name

    return {
        os.path.basename(os.path.dirname(get_checkpoint_name(
            "", 0, pipeline_parallel=layout["PP"] > 1, tensor_rank=tp, pipeline_rank=pp,
            expert_parallel=layout["EP"] > 1, expert_rank=ep)))
        for tp in range(layout["TP"]) for pp in range(layout["PP"]) for ep in range(layout["EP"])
    }


def resume_layout_problem(args) -> str | None:
    """Why the checkpoint ``--load`` names cannot be resumed at this run's parallel layout (None: it can, or there
    is nothing to resume). ``args``: megatron's validated arguments."""
    path = _checkpoint_to_load(args)
    if path is None:
        return None
    here = _layout(args)
    if not os.path.isfile(os.path.join(path, "metadata.json")):  # --ckpt-format torch: one file per model rank
        saved_dirs = {name for name in os.listdir(path) if name.startswith("mp_rank_")}
        if saved_dirs and saved_dirs != _legacy_rank_dirs(here):
            return (f"{path} is a --ckpt-format torch checkpoint with one file per model-parallel rank "
                    f"({', '.join(sorted(saved_dirs))}), which loads only at the layout that saved it, and this run's "
                    f"layout ({_layout_text(here)}) is another one. Resume at the layout that saved it; checkpoints in "
                    f"the default --ckpt-format torch_dist load at any layout.")
        return None
    if getattr(args, "no_load_optim", False) or getattr(args, "finetune", False):
        return None  # weights only: torch_dist reshards them
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(path)
    saved = common.get("args")
    if saved is None or getattr(saved, "no_save_optim", False) or "optimizer" not in common:
        return None
    was = _layout(saved)
    weights_only = ("or add --no-load-optim to load the weights alone (torch_dist reshards them; Adam's moments and "
                    "the LR schedule start afresh)")
    if _experts_in_own_optimizer(saved) != _experts_in_own_optimizer(args):
        where = {True: "in an optimizer of their own", False: "in the same optimizer as the other weights"}
        return (f"the optimizer state in {path} was saved at {_layout_text(was)}, with the expert weights "
                f"{where[_experts_in_own_optimizer(saved)]}; at this run's {_layout_text(here)} megatron-core puts "
                f"them {where[_experts_in_own_optimizer(args)]} (it does so when EP > 1 or the expert TP size differs "
                f"from TP) and cannot load one into the other. Resume with EP and expert TP as saved, {weights_only}.")
    sharding = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    if (getattr(saved, "use_distributed_optimizer", False) and getattr(args, "use_distributed_optimizer", False)
            and sharding == "dp_reshardable" and was != here):
        return (f"the distributed-optimizer state in {path} was saved in megatron's default dp_reshardable format, "
                f"which loads only at the (TP, PP, EP) layout that saved it ({_layout_text(was)}); this run has "
                f"{_layout_text(here)}. Resume at the saved layout, {weights_only}. To change layouts with the "
                f"optimizer state later, save with --dist-ckpt-optim-fully-reshardable (slower saves).")
    return None


def check_resume_layout(args) -> None:
    """Stop with one line that names the fixes when :func:`resume_layout_problem` finds one. It runs before the
    process group exists: every rank decides alike from the same files, and only global rank 0 says why."""
    from megatron_ext.training.runtime import startup_error

    problem = resume_layout_problem(args)
    if problem is not None:
        raise startup_error(f"cannot resume: {problem}")
