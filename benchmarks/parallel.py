"""Parallel layouts of the 8B-A1B MoE slice on GPUs: same losses as one GPU (bf16), and tokens/s per GPU.

The slice is ``examples/moe_8b_a1b_swa_hsa.yaml`` cut to a few layers (full width: hidden 2048, 16 query heads,
64 experts of FFN 768, top-4, a shared expert, HSA with one KV head), trained in bf16 with megatron-core's DDP,
optimizer (fp32 main weights) and schedules. Usage, in this order, sharing one work directory::

    python benchmarks/parallel.py --layout single --work /tmp/par          # one GPU: saves the initial weights
    torchrun --nproc-per-node 2 benchmarks/parallel.py --layout tp2,ep2 --work /tmp/par
    python benchmarks/parallel.py --report --work /tmp/par --out benchmarks/results/parallel.jsonl

Every multi-GPU layout loads the single-GPU initial checkpoint (``dist_checkpointing``, resharded at load), trains
the same global batches (each data-parallel rank takes its micro-batches), and reports per-step losses. The report
compares them with the single GPU's (relative difference; bf16 reorders sums, so ~1e-3 is expected) and records
tokens/s per GPU (steps after the warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "moe_8b_a1b_swa_hsa.yaml")
LAYOUTS = {
    "single": dict(tp=1, ep=1),
    "tp2": dict(tp=2, ep=1),
    "ep2": dict(tp=1, ep=2),
}
BF16_LOSS_RTOL = 1e-2


def _config(args, tp: int, ep: int, pattern: str):
    from megatron_ext.models.config import config_from_yaml

    return config_from_yaml(
        YAML,
        num_layers=len(pattern.replace("[", " ").replace("]", " ").split()),
        layer_pattern=pattern,
        seq_length=args.seq_length,
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,  # megatron's MoE needs SP under TP
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
        bf16=True,
        params_dtype=torch.bfloat16,
        hsa_gumbel_noise=False,  # random noise would differ between layouts
        calculate_per_token_loss=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        **_overrides(args),
    )


def _overrides(args) -> dict:
    """--override key=value (ints, floats and words): a smaller slice for smoke tests."""
    out = {}
    for item in args.override:
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key] = value
    return out


def _choose_pattern(args) -> str:
    """The slice: one retrieval group (HSA with inner SWA, then SWA) if HSA layers accept TP=2 with sequence
    parallelism, else two SWA layers (still the 8B-A1B's attention, norms and MoE)."""
    if args.pattern:
        return args.pattern
    try:
        _config(args, 2, 1, "[hsa swa]")
        return "[hsa swa]"
    except ValueError as e:
        print(f"HSA layers refuse TP=2+SP here ({e}); the slice uses 'swa*2'", flush=True)
        return "swa*2"


def _batches(args, vocab: int):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.steps):
        step = []
        for _ in range(args.micro_batches):
            t = torch.randint(0, vocab, (1, args.seq_length + 1), generator=gen)
            step.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        out.append(step)
    return out


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    tokens, labels = tokens.cuda(non_blocking=True), labels.cuda(non_blocking=True)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    out = model(tokens, position_ids, None, labels=labels)

    def loss_func(per_token):
        total = per_token.float().sum()
        n = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
        return total, n, {"lm loss": torch.stack([total.detach(), n.float()])}

    return out, loss_func


def run_layout(args, name: str, pattern: str) -> dict:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from megatron_ext.models.builder import build_model

    tp, ep = LAYOUTS[name]["tp"], LAYOUTS[name]["ep"]
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=1
    )
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    config = _config(args, tp, ep, pattern)
    model = build_model(config).cuda()
    init_dir = os.path.join(args.work, "init")
    if name == "single":
        os.makedirs(init_dir, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), init_dir)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), init_dir))
    torch.distributed.barrier()
    model = Float16Module(config, model)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, bf16=True, params_dtype=torch.bfloat16, clip_grad=1.0,
                        adam_eps=1e-5, weight_decay=0.01),
        [ddp],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = args.micro_batches // dp
    losses, step_s = [], []
    for step_batches in _batches(args, config.vocab_size):
        mine = step_batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(mine), model=ddp, num_microbatches=per_rank,
            seq_length=args.seq_length // tp, micro_batch_size=1, forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t0)
        total = torch.zeros(2, dtype=torch.float64, device="cuda")
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            for d in out:
                total += d["lm loss"].double()
        torch.distributed.all_reduce(total)
        losses.append((total[0] / total[1]).item())
        if not ok:
            raise RuntimeError(f"{name}: optimizer step skipped")
    timed = step_s[args.warmup_steps:]
    world = torch.distributed.get_world_size()
    tokens_per_step = args.micro_batches * args.seq_length
    step_time = sorted(timed)[len(timed) // 2]
    return dict(
        layout=name, tp=tp, ep=ep, gpus=world, pattern=pattern, seq_length=args.seq_length,
        micro_batches=args.micro_batches, losses=losses, step_ms=[round(s * 1e3, 1) for s in step_s],
        median_step_ms=round(step_time * 1e3, 1), tokens_per_s_per_gpu=round(tokens_per_step / step_time / world),
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )


def train(args) -> None:
    from megatron_ext.compat import cpu as cpu_compat

    cpu_compat.apply()  # no-op on GPUs; lets the script be smoke-tested on a CPU
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    cpu_compat.init_process_group(rank, world)
    meta_path = os.path.join(args.work, "pattern.txt")
    if "single" in args.layout:
        pattern = _choose_pattern(args)
        os.makedirs(args.work, exist_ok=True)
        with open(meta_path, "w") as f:
            f.write(pattern)
    else:
        with open(meta_path) as f:
            pattern = f.read().strip()
    for name in args.layout.split(","):
        result = run_layout(args, name, pattern)
        if rank == 0:
            print(json.dumps(result), flush=True)
            with open(os.path.join(args.work, f"{name}.json"), "w") as f:
                json.dump(result, f)
    torch.distributed.destroy_process_group()


def report(args) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import environment, format_table, record

    results = {}
    for name in LAYOUTS:
        path = os.path.join(args.work, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[name] = json.load(f)
    if "single" not in results:
        raise SystemExit(f"no single-GPU result in {args.work}: run --layout single first")
    ref = results["single"]["losses"]
    rows = []
    for name, r in results.items():
        rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref))
        r["max_rel_loss_diff_vs_single"] = rel
        r["matches_single_bf16"] = rel <= BF16_LOSS_RTOL
        rows.append({"layout": name, "gpus": r["gpus"], "slice": r["pattern"], "max rel loss diff": f"{rel:.2e}",
                     "step ms": r["median_step_ms"], "tok/s/GPU": r["tokens_per_s_per_gpu"],
                     "peak GiB": r["peak_mem_gib"], "losses": " ".join(f"{x:.4f}" for x in r["losses"])})
        if args.out:
            record(args.out, section="parallel", commands=args.commands, **r)
    columns = ["layout", "gpus", "slice", "max rel loss diff", "step ms", "tok/s/GPU", "peak GiB", "losses"]
    print(f"GPU: {environment().get('gpu')}")
    print(format_table(rows, columns))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="single", help="comma-separated: single, tp2, ep2")
    p.add_argument("--work", required=True, help="shared work directory (initial checkpoint, per-layout results)")
    p.add_argument("--report", action="store_true", help="compare the layouts' results and record them")
    p.add_argument("--out", default=None, help="with --report: append the results to this .jsonl")
    p.add_argument("--commands", default="", help="with --report: the exact commands that produced the results")
    p.add_argument("--pattern", default=None, help="layer pattern of the slice (default: '[hsa swa]')")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batches", type=int, default=4, help="per step, over all data-parallel ranks")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--override", nargs="*", default=[], help="config overrides key=value (smoke tests)")
    args = p.parse_args()
    if args.report:
        report(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
