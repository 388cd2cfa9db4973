"""Running megatron-core 0.19.2 on a machine without a CUDA GPU.

megatron-core assumes CUDA in a few hundred places. This module is the *only* place where the project works around
that: :func:`apply` installs a small set of patches, each commented with the megatron-core code that needs it, and
does nothing at all when CUDA is available. Nothing else in the project patches megatron-core for the CPU.

Call :func:`apply` before building models, optimizers or process groups (the test fixtures, ``pretrain_hsa.py`` and
the demo do). It is idempotent.
"""

from __future__ import annotations

import logging
import operator
import os
import random
import socket
from functools import reduce

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on loopback that is free right now (for a rendezvous).

    Drawn below the kernel's ephemeral range: a port the kernel hands out (``bind(0)``) is the next one it gives
    to some other process's outgoing connection too (gloo opens many), which then holds it before our rendezvous
    server binds it (EADDRINUSE when test modules run side by side). The draw uses the OS's randomness, never
    ``random``'s state, which training seeds alike in every process.
    """
    ephemeral_low, _ = _ephemeral_port_range()
    low, high = 15000, min(ephemeral_low, 65536) - 1
    draw = random.SystemRandom()
    if high > low:
        for _ in range(64):
            port = draw.randint(low, high)
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_port_clash(error_text: str) -> bool:
    """Whether a failure is a rendezvous port taken between ``free_port`` and the bind (worth one more try)."""
    return "EADDRINUSE" in error_text or "Address already in use" in error_text


# ----------------------------------------------------------------------------------------------------------------
# CUDA objects that megatron-core creates unconditionally.
# ----------------------------------------------------------------------------------------------------------------
class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _to_cpu_device(device):
    if isinstance(device, int) or (isinstance(device, (str, torch.device)) and str(device).startswith("cuda")):
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device='cuda'`` (and integer devices) to the CPU in every torch call.

    Needed by hard-coded CUDA allocations in the optimizer (``optimizer.py`` found_inf/_scale_one buffers,
    ``grad_scaler.py``), ``clip_grads.py`` (norm buffers), ``pipeline_parallel/schedules.py``
    (``total_num_tokens``) and ``distributed/param_and_grad_buffer.py``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is not None:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            # ``models/common/embeddings/rope_utils.get_pos_emb_on_this_cp_rank`` (RoPE under context parallelism)
            # builds its index with ``pin_memory=True``, which needs a CUDA driver.
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device, int)):
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


_original_tensor_type = torch.Tensor.type


def _tensor_type_reporting_cuda(self, dtype=None, non_blocking=False, **kwargs):
    # The megatron optimizers check parameter types by their CUDA type strings:
    # ``optimizer.py`` ("Wrapped parameters must be one of torch.cuda.FloatTensor ..."),
    # ``distrib_optimizer.py`` (same check) and ``clip_grads.py`` (assert grad.type() == 'torch.cuda.FloatTensor').
    if dtype is None and not kwargs:
        name = _original_tensor_type(self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name
    return _original_tensor_type(self, dtype, non_blocking, **kwargs)


def _patch_torch_cuda():
    # Parameter and grad-buffer allocation (``tensor_parallel/layers.py``, ``param_and_grad_buffer.py``), the MoE
    # router (``router.py`` moves its weight to ``torch.cuda.current_device()``) and the alltoall dispatcher's
    # side stream and events (``token_dispatcher.py``); ``dist_checkpointing`` saves call
    # ``torch.cuda.synchronize()`` (``strategies/filesystem_async.py``).
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda *args, **kwargs: None
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda stream=None: _NullStream()
    torch.cuda.Event = _NullEvent
    torch.cuda.set_device = lambda *args, **kwargs: None
    torch.cuda.memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.memory_reserved = lambda *args, **kwargs: 0
    torch.cuda.max_memory_reserved = lambda *args, **kwargs: 0
    torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None
    # ``Tensor.cuda()`` / ``Module.cuda()`` are called on batches and models by megatron's training utilities.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _tensor_type_reporting_cuda


def _patch_rng():
    # ``tensor_parallel/random.py``: the RNG tracker (dropout, sequence parallel, expert init) saves and restores
    # the CUDA generator's state; back it with the CPU generator so that ``get_cuda_rng_tracker().fork()`` works.
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # The tracker's ``add`` seeds the "CUDA" generator between saving and restoring its state.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it after seeding the CPU
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)


def _patch_global_memory_buffer():
    # ``utils.GlobalMemoryBuffer.get_tensor`` allocates scratch memory (sequence-parallel all-gathers, local
    # attention) with ``device=torch.cuda.current_device()``.
    from megatron.core import utils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        numel = reduce(operator.mul, tensor_shape, 1)
        buffer = self.buffer.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype, device="cpu")
        return buffer[0:numel].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor


def _patch_moe_host_copies():
    # ``moe/moe_utils.maybe_move_tensor_to_cpu(as_numpy=True)`` returns CPU tensors unchanged (it only converts CUDA
    # ones), so the alltoall dispatcher passes a tensor where ``all_to_all_single`` needs a list of split sizes.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_dataset_helpers():
    # ``megatron.training.initialize`` calls ``datasets.utils.compile_helpers()``, which runs ``make`` in a folder
    # the wheel ships without a Makefile and then ``sys.exit(1)``. The prebuilt helpers .so imports fine.
    from megatron.core.datasets import utils as dataset_utils

    dataset_utils.compile_helpers = lambda: None


def apply() -> bool:
    """Make megatron-core usable on the CPU. Returns True if patches were applied (no CUDA), False otherwise."""
    global _APPLIED
    if cuda_available():
        return False
    if _APPLIED:
        return True
    # Single-threaded ranks: several gloo ranks share the machine's cores.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _patch_torch_cuda()
    _patch_rng()
    _patch_global_memory_buffer()
    _patch_moe_host_copies()
    _patch_dataset_helpers()
    _CudaToCpuMode().__enter__()  # stays active for the rest of the process
    _APPLIED = True
    return True


_TRAINING_APPLIED = False


def apply_training() -> bool:
    """:func:`apply` plus what ``megatron.training.pretrain()`` needs on the CPU (used by ``pretrain_hsa.py``).

    Kept apart from :func:`apply` because importing ``megatron.training`` costs seconds that the test fixtures,
    which use megatron-core alone, need not pay. No-op with CUDA; idempotent.
    """
    global _TRAINING_APPLIED
    if not apply():
        return False
    if _TRAINING_APPLIED:
        return True
    # ``training/initialize.py``: ``_initialize_distributed`` initialises megatron's model-parallel groups only
    # ``if torch.cuda.device_count() > 0``, and ``_set_random_seed`` seeds the (CPU-backed, see _patch_rng) RNG
    # tracker under the same test; ``dist_checkpointing/strategies/async_utils.py`` takes
    # ``rank % torch.cuda.device_count()``. One visible "device" makes all three take their normal path.
    torch.cuda.device_count = lambda: 1
    # ``training/arguments.py`` (``validate_args``, TP or CP > 1) reads the GPU architecture through
    # ``utils.common_utils.get_device_arch_version`` -> ``torch.cuda.get_device_properties(...).major``; report a
    # pre-Blackwell device, whose path only asks that CUDA_DEVICE_MAX_CONNECTIONS=1 (set by :func:`apply`).
    import types

    torch.cuda.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(
        name="cpu", major=9, minor=0, total_memory=0, multi_processor_count=1)
    # ``training/initialize.py``: ``initialize_megatron`` asserts ``torch.cuda.is_available()`` unless called with
    # ``allow_no_cuda=True``; ``training.pretrain`` calls it without, through the name it imported.
    from megatron.training import initialize as megatron_initialize
    from megatron.training import training as megatron_training

    original_initialize = megatron_initialize.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original_initialize(*args, **kwargs)

    megatron_initialize.initialize_megatron = initialize_megatron
    megatron_training.initialize_megatron = initialize_megatron

    # ``training.pretrain`` builds the data iterators after a checkpoint load has restored the RNG states, and
    # creating a DataLoader iterator draws a base seed from the default CPU generator. On a GPU that generator is not
    # the one dropout uses; here it is (_patch_rng backs the "CUDA" generator with it), so a resumed run would drop
    # out differently from an uninterrupted one. Building the iterators under fork_rng leaves the generator as the
    # load (or the seeding) left it, in every run alike.
    original_build_iterators = megatron_training.build_train_valid_test_data_iterators

    def build_train_valid_test_data_iterators(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return original_build_iterators(*args, **kwargs)

    megatron_training.build_train_valid_test_data_iterators = build_train_valid_test_data_iterators
    _TRAINING_APPLIED = True
    return True


def init_process_group(rank: int = 0, world_size: int = 1, port: int | None = None, timeout_s: float = 120.0):
    """Initialise ``torch.distributed`` on loopback: gloo without CUDA, NCCL with it."""
    import datetime

    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if port is not None:
        os.environ["MASTER_PORT"] = str(port)
    elif "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if cuda_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.distributed.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )
