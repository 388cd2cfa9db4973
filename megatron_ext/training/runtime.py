"""Process set-up for ``pretrain_hsa.py`` and the hooks it adds to ``megatron.training``.

``prepare_process()`` runs before megatron builds anything: the CPU shims of ``megatron_ext.compat.cpu`` (no-op with
CUDA), a Hugging Face ``tokenizer.json`` file as ``--tokenizer-model`` and, for a plain ``python pretrain_hsa.py``
without a launcher, a world of one process.

``install_training_hooks(args)`` wires our pieces into megatron's own loop, each in its one module:

* ``optimizer_resume``: the distributed-optimizer resume workaround (megatron-core 0.19.2 without apex/TE);
* ``fused_adam``: torch's fused AdamW in place of megatron's foreach torch-AdamW fallback (``--no-torch-fused-adam``
  keeps the latter);
* ``checkpointing``: atomic ``latest`` marker, keep-last-K, crash-safe saves, and a resume at a parallel layout
  megatron-core cannot load the checkpoint's optimizer state into refused up front;
* ``logging``: tokens/s and MFU per log line from our FLOP model (``flops``), MoE aux losses;
* ``data``: no validation on an empty validation split.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import torch

from megatron_ext.compat import cpu as cpu_compat


def prepare_process() -> None:
    """CPU shims and single-process rendezvous defaults; safe to call more than once."""
    if not torch.cuda.is_available():
        # Several gloo ranks share a few cores: one intra-op thread each unless the user said otherwise.
        if "OMP_NUM_THREADS" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            torch.set_num_threads(1)
    cpu_compat.apply_training()
    _skip_dataset_helper_compilation()
    _read_tokenizer_json_files()
    if "RANK" not in os.environ:  # `python pretrain_hsa.py ...` without torchrun: a world of one
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(cpu_compat.free_port()))


def _skip_dataset_helper_compilation() -> None:
    """``initialize_megatron`` runs ``compile_helpers()`` on rank 0: ``make`` in a folder the pip wheel ships without
    a Makefile, then ``sys.exit(1)`` (megatron_core_notes.md, H100 appendix, obstacle 1). The wheel's prebuilt
    ``helpers_cpp`` is what the datasets use; when it imports, there is nothing to compile. (On the CPU
    ``megatron_ext.compat.cpu`` does the same.)"""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return  # a source checkout without the built helpers: let megatron build them
    from megatron.core.datasets import utils as dataset_utils

    dataset_utils.compile_helpers = lambda: None


def _read_tokenizer_json_files() -> None:
    """``--tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json``, as preprocessing takes it, through
    ``megatron_ext.training.data.build_tokenizer``; megatron builds the tokenizer in ``parse_and_validate_args``."""
    from megatron.training import global_vars

    from megatron_ext.training import data

    global_vars.build_tokenizer = data.build_tokenizer


INTERRUPTED_STATUS = 128 + signal.SIGINT  # 130: the shell's status for a process ended by Ctrl-C


def run_failing_fast(fn, *args, **kwargs):
    """Call ``fn``; if it raises, print the error and end the process at once with a non-zero status.

    After an exception inside megatron's training loop, an H100 run was seen to hang at interpreter exit instead of
    failing: ``multiprocessing`` joined a child it had forked while the data loaders' pin-memory threads still
    waited, which would hold a SLURM allocation until its time limit. A failed run has nothing left to save, so it
    skips the interpreter's teardown (``os._exit``). A clean ``sys.exit(0)`` (e.g. ``--exit-interval``) passes
    through untouched.
    """
    try:
        return fn(*args, **kwargs)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C without --exit-signal-handler (else listen_for_preemption catches it)
        print(f"pretrain_hsa.py: interrupted (Ctrl-C); exiting with status {INTERRUPTED_STATUS} without saving",
              file=sys.stderr)
        code = INTERRUPTED_STATUS
    except BaseException:  # noqa: BLE001 - any failure ends the run
        traceback.print_exc()
        code = 1
    if code != INTERRUPTED_STATUS:
        print(f"pretrain_hsa.py: the run failed; exiting with status {code}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def startup_error(message: str) -> SystemExit:
    """The exit for a problem found before the process group exists: every rank finds it alike from the same
    arguments and files, and only global rank 0 prints the line (not one copy per GPU)."""
    return SystemExit(f"pretrain_hsa.py: {message}" if int(os.environ.get("RANK", "0")) == 0 else 1)


def install_training_hooks(args) -> None:
    """Install the workarounds and additions to ``megatron.training`` that ``args`` asks for."""
    from megatron_ext.training import checkpointing, data, fused_adam, logging as hsa_logging, optimizer_resume
    from megatron_ext.training import model

    model.check_config(args)
    checkpointing.check_resume_layout(args)
    optimizer_resume.install()
    data.skip_validation_without_data()
    if args.torch_fused_adam:
        fused_adam.install()
    checkpointing.install(keep_last=args.keep_last_checkpoints, async_save=args.async_save)
    hsa_logging.install(args)
    listen_for_preemption(args)


# SLURM warns a job before preempting or timing it out with SIGUSR1 (``#SBATCH --signal=B:USR1@<seconds>``), then
# sends SIGTERM; torchrun passes SIGTERM on to the workers. Ctrl-C (SIGINT) is a user's way to stop a run: the first
# one is a preemption like the others, a second one aborts at once.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def listen_for_preemption(args) -> None:
    """With ``--exit-signal-handler`` (on by default here) any preemption signal makes megatron save a checkpoint
    (with ``--save``) at the end of the current iteration and exit with status 0.

    megatron's handler listens to one signal (``--exit-signal``, default SIGTERM); the others of
    ``PREEMPTION_SIGNALS`` are routed to the same flag, which every rank reads collectively after each iteration.
    SIGINT always gets our handler, which says what will happen and makes a second Ctrl-C abort without saving
    (status 130): a save can take minutes, and the ``latest`` marker only ever names complete checkpoints.
    """
    if not args.exit_signal_handler:
        return
    from megatron.training.global_vars import get_signal_handler

    handler = get_signal_handler()
    main_pid = os.getpid()  # forked data-loader workers inherit these handlers; only the main process speaks
    interrupts = [0]

    def note_signal(signum, frame):
        handler._signal_received = True  # noqa: SLF001 - the flag megatron's own handler sets

    def note_interrupt(signum, frame):
        if os.getpid() != main_pid:
            return  # a data-loader worker: keep serving batches until the main process stops
        interrupts[0] += 1
        if interrupts[0] > 1:
            _say("pretrain_hsa.py: second Ctrl-C: aborting now without saving; "
                 f"exiting with status {INTERRUPTED_STATUS}")
            os._exit(INTERRUPTED_STATUS)
        handler._signal_received = True  # noqa: SLF001
        then = "saving a checkpoint to --save and exiting" if args.save else "exiting (no --save: nothing is saved)"
        if getattr(args, "rank", 0) == 0:
            _say(f"pretrain_hsa.py: Ctrl-C: {then} at the end of this iteration; press Ctrl-C again to abort now")

    for sig in PREEMPTION_SIGNALS:
        if sig == signal.SIGINT:
            signal.signal(sig, note_interrupt)
        elif sig != handler.sig:
            signal.signal(sig, note_signal)


def _say(message: str) -> None:
    """Write one line to stderr from a signal handler (``os.write``: ``print`` there can re-enter the stream)."""
    os.write(sys.stderr.fileno(), (message + "\n").encode())
