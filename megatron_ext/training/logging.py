"""What ``pretrain_hsa.py`` adds to megatron's training log.

megatron's own line per ``--log-interval`` (iteration, ``lm loss``, learning rate, grad norm, loss scale, MoE
auxiliary losses with ``--num-experts``, memory after the first iterations) and its TensorBoard scalars
(``lm loss``, ``learning-rate``, ``grad-norm``, ``batch-size``, ``throughput``, ``iteration-time``, ``mem-*``, ...)
stay as they are. This module, installed once by :func:`install`:

* replaces megatron's FLOP count (``training.num_floating_point_operations``, a dense-GPT formula) with
  :class:`megatron_ext.training.flops.FlopModel`, which counts SWA, HSA/GCA and MoE layers as built, so megatron's
  ``throughput per GPU (TFLOP/s/GPU)`` and its progress log are right for these models;
* prints a second line per interval: tokens/s, TFLOP/s per GPU, MFU (against ``--peak-tflops``, default the
  listed bf16 peak of the GPU: H100 SXM/PCIe/NVL, H200) and peak memory, and writes ``tokens-per-sec``,
  ``tflops-per-gpu`` and ``mfu`` to TensorBoard;
* makes the interval after the first logged iteration start afresh. megatron logs the first iteration of every run
  without resetting its sums, so after a resume the next logged ``lm loss`` is the mean of two iterations
  (megatron_core_notes.md, H100 appendix); with this, every logged value covers exactly its own interval, and a
  resumed run logs the same ``lm loss`` per iteration as an uninterrupted one.
"""

from __future__ import annotations

import torch

from megatron_ext.training.flops import FlopModel, peak_tflops

_STATE: dict = {"model_chunks": [], "flop_model": None, "iterations": 0, "installed": False}
_COUNTER_KEYS = ("advanced iterations", "skipped iterations", "nan iterations")


def register_model_chunk(chunk: torch.nn.Module) -> None:
    """Called by the model provider for every model chunk it builds (the FLOP model counts their parameters)."""
    _STATE["model_chunks"].append(chunk)
    _STATE["flop_model"] = None


def flop_model(args) -> FlopModel:
    if _STATE["flop_model"] is None:
        from megatron_ext.training.model import transformer_config_from_args

        config = _STATE.get("config") or transformer_config_from_args(args)
        _STATE["config"] = config
        _STATE["flop_model"] = FlopModel.from_model(
            _STATE["model_chunks"], config, seq_length=args.seq_length, vocab_size=args.padded_vocab_size,
            tied_output_layer=not args.untie_embeddings_and_output_weights,
        )
    return _STATE["flop_model"]


def num_floating_point_operations(args, batch_size, seqlen_squared_sum_in_batch=None,
                                  total_real_tokens_in_batch=None):
    """Drop-in for megatron's function of the same name: FLOPs of one global batch of ``batch_size`` sequences."""
    return flop_model(args).training_flops(batch_size)


def _interval_line(args, iteration: int, elapsed_s: float, iterations: int) -> tuple[str, dict]:
    from megatron.core.num_microbatches_calculator import get_current_global_batch_size

    batch = get_current_global_batch_size()
    tokens = batch * args.seq_length * iterations
    tokens_per_s = tokens / max(elapsed_s, 1e-12)
    tflops_per_gpu = flop_model(args).training_flops(batch) * iterations / max(elapsed_s, 1e-12) / 1e12 / args.world_size
    values = {"tokens-per-sec": tokens_per_s, "tflops-per-gpu": tflops_per_gpu}
    line = (f" [perf] iteration {iteration:8d} | tokens/s: {tokens_per_s:,.0f} | "
            f"TFLOP/s/GPU: {tflops_per_gpu:.1f} |")
    peak = peak_tflops(args.peak_tflops)
    if peak:
        values["mfu"] = tflops_per_gpu / peak
        line += f" MFU: {100 * values['mfu']:.1f}% |"
    elif torch.cuda.is_available() and not _STATE.get("told_no_peak"):
        _STATE["told_no_peak"] = True  # once per run: a wrong peak would make every MFU figure wrong
        line = (f" [perf] no MFU: the bf16 peak of '{torch.cuda.get_device_name()}' is not listed in "
                f"megatron_ext/training/flops.py; give --peak-tflops (dense TFLOP/s per GPU)\n") + line
    if torch.cuda.is_available():
        line += f" max memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB |"
    return line, values


def install(args) -> None:
    """Wrap megatron's ``training_log`` and FLOP counter (idempotent)."""
    if _STATE["installed"]:
        return
    from megatron.training import training as megatron_training

    original_training_log = megatron_training.training_log
    megatron_training.num_floating_point_operations = num_floating_point_operations

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs):
        from megatron.training import get_args, get_tensorboard_writer, get_timers
        from megatron.training.utils import print_rank_last

        args = get_args()
        is_first = kwargs.get("is_first_iteration", False)
        _STATE["iterations"] += 1
        logging_now = iteration % args.log_interval == 0 or is_first
        elapsed = get_timers()("interval-time").elapsed(reset=False, barrier=False) if logging_now else None
        result = original_training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs)
        if not logging_now:
            return result
        line, values = _interval_line(args, iteration, elapsed, _STATE["iterations"])
        print_rank_last(line)
        writer = get_tensorboard_writer()
        if writer and not is_first:
            for name, value in values.items():
                writer.add_scalar(name, value, iteration)
        if is_first:
            # megatron kept its sums and its interval timer running after the first iteration's log; restart both
            # so that the next logged interval covers only its own iterations.
            for key in list(total_loss_dict):
                if key in _COUNTER_KEYS:
                    total_loss_dict[key] = 0
                else:
                    total_loss_dict[key] = torch.zeros_like(total_loss_dict[key])
            get_timers()("interval-time").elapsed(reset=True, barrier=False)
        _STATE["iterations"] = 0
        return result

    megatron_training.training_log = training_log
    _STATE["installed"] = True
