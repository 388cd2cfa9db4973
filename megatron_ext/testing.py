"""Multi-rank test harness: run a function on N ranks of a fresh gloo (CPU) or NCCL (GPU) world.

Used by the test-suite (``tests/``) and usable by anyone checking a parallel layout by hand::

    results = run_on_ranks(my_check, world_size=2, tensor_model_parallel_size=2)

Each rank is a spawned process with one torch thread, a rendezvous on a free loopback port, megatron-core's model
parallel state initialised as asked, and a clean teardown: if any rank raises, the others are terminated, every
process is joined, and the first rank's traceback is re-raised in the caller. Nothing outlives the call.
"""

from __future__ import annotations

import io
import os
import queue
import signal
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megatron_ext.compat import cpu as cpu_compat


class RankFailed(RuntimeError):
    """A rank raised; the message carries its traceback."""


def initialize_megatron_parallel(seed: int = 1234, **parallel_sizes) -> None:
    """Initialise megatron-core's parallel state and RNG on the current process group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(**parallel_sizes)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def teardown_megatron_parallel() -> None:
    """Destroy megatron's parallel state *and* the process groups it created.

    ``destroy_model_parallel`` only forgets its groups; each gloo group keeps its threads, so a process that
    re-initialises parallel state many times (the test-suite, layout sweeps) would pile up thousands of threads.
    """
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        world = distributed_c10d.GroupMember.WORLD
        for group in list(distributed_c10d._world.pg_map):
            if group is not world and group is not None:
                torch.distributed.destroy_process_group(group)


def _rank_main(rank, world_size, port, fn, args, kwargs, parallel_sizes, seed, results):
    # Lead a process group of its own, so that the parent can end this rank together with anything it started
    # (checkpoint writers, data workers) in one signal.
    os.setpgrp()
    try:
        torch.set_num_threads(1)
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
        os.environ["LOCAL_RANK"] = str(rank)
        cpu_compat.apply()
        cpu_compat.init_process_group(rank, world_size, port=port)
        initialize_megatron_parallel(seed=seed, **parallel_sizes)
        out = fn(*args, **kwargs)
        # Serialise here: tensors sent through the queue as shared memory would vanish when this rank exits.
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            teardown_megatron_parallel()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:
            pass


def _kill_process_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# Another process may take the rendezvous port between free_port() and rank 0's bind: start again on a new one.
_PORT_ATTEMPTS = 3


def _launch(ctx, world_size, fn, args, kwargs, parallel_sizes, seed, timeout_s):
    results = ctx.Queue()
    port = cpu_compat.free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, fn, args, kwargs, parallel_sizes, seed, results),
            daemon=False,  # ranks may start workers of their own (dist-checkpoint writers)
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    failure = None
    try:
        deadline = timeout_s
        start = time.monotonic()
        while len(outputs) < world_size and failure is None:
            remaining = deadline - (time.monotonic() - start)
            if remaining <= 0:
                failure = f"timed out after {timeout_s:.0f}s waiting for ranks {sorted(set(range(world_size)) - set(outputs))}"
                break
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in outputs]
                if dead and all(p.exitcode not in (None, 0) for p in (procs[i] for i in dead)):
                    failure = f"rank(s) {dead} died with exit codes {[procs[i].exitcode for i in dead]}"
                continue
            if status == "ok":
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failure = f"rank {rank} failed:\n{payload}"
    finally:
        for p in procs:
            if failure is not None and p.is_alive():
                p.terminate()
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
            _kill_process_group(p.pid)  # a rank's own children outlive it otherwise
        results.close()
    return outputs, failure


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args,
    timeout_s: float = 300.0,
    seed: int = 1234,
    parallel_sizes: dict | None = None,
    **kwargs,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the per-rank results in rank order.

    ``fn`` must be importable (a module-level function) and return picklable values (move tensors to CPU).
    ``parallel_sizes`` go to ``parallel_state.initialize_model_parallel`` (e.g. ``tensor_model_parallel_size=2``).
    """
    ctx = mp.get_context("spawn")
    for attempt in range(_PORT_ATTEMPTS):
        outputs, failure = _launch(ctx, world_size, fn, args, kwargs, parallel_sizes or {}, seed, timeout_s)
        if failure is None or not cpu_compat.is_port_clash(failure) or attempt == _PORT_ATTEMPTS - 1:
            break
    if failure is not None:
        raise RankFailed(failure)
    return [outputs[r] for r in range(world_size)]


# ----------------------------------------------------------------------------------------------------------------
# Moving full (single-device) weights and gradients in and out of a tensor-parallel model, for equivalence tests.
# ----------------------------------------------------------------------------------------------------------------
def _tp_partition_dim(param: torch.nn.Parameter) -> int | None:
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def load_full_state_into_tp_model(model: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Copy a TP=1 state dict into a tensor-parallel model by slicing each TP-sharded parameter.

    Only plain contiguous sharding is handled (``partition_stride == 1``); fused gated MLP weights
    ([gate; up] in one matrix) are not: use dist_checkpointing for those.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = full_state[name]
            dim = _tp_partition_dim(param)
            if dim is not None and tp_size > 1:
                if getattr(param, "partition_stride", 1) != 1:
                    raise ValueError(f"{name}: strided TP sharding is not supported here")
                full = full.chunk(tp_size, dim=dim)[tp_rank]
            if full.shape != param.shape:
                raise ValueError(f"{name}: full slice {tuple(full.shape)} does not match {tuple(param.shape)}")
            param.copy_(full)


def gather_full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """All-gather every TP-sharded gradient into its full (TP=1) shape; returns CPU float tensors."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.main_grad if getattr(param, "main_grad", None) is not None else param.grad
        if grad is None:
            continue
        dim = _tp_partition_dim(param)
        if dim is not None and tp_size > 1:
            parts = [torch.empty_like(grad) for _ in range(tp_size)]
            torch.distributed.all_gather(parts, grad.contiguous(), group=group)
            grad = torch.cat(parts, dim=dim)
        grads[name] = grad.detach().float().cpu().clone()
    return grads
