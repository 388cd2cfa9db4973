"""Whole-model training steps on one GPU: SWA+HSA-345M at 8K tokens, its full-attention and SWA-only baselines,
and a 2-layer slice of the 8B-A1B SWA+HSA MoE, in bf16, through megatron-core's GPTModel.

    python benchmarks/model_step.py                     # everything; appends to benchmarks/results/model_step.jsonl
    python benchmarks/model_step.py --models swa_hsa_345m --steps 5 --out /tmp/x.jsonl
    python benchmarks/model_step.py --models swa_hsa_345m gpt_345m_swa --micro-batch 2 --fused-kernels both

A step is built as pretrain_hsa.py builds it: megatron's torch.compile'd SwiGLU and bias-dropout-add (Megatron-LM's
default flags), and the fused RMSNorm and cross entropy of ``megatron_ext.kernels.fused`` (``--fused-kernels``).

A step is forward + backward + AdamW on bf16 parameters (no distributed optimizer: one GPU, no data parallelism).
Printed per model: step time (median of the timed steps, after warm-up steps that include torch.compile and Triton
autotuning), tokens/s, model TFLOP/s and MFU against the H100's 989 dense bf16 TFLOP/s, and peak memory.
FLOPs: 6 x tokens x (active parameters, MoE by top-k, tied embedding once as the output layer) plus attention:
full causal 2 L^2 Hq d, window 4 Hq d (W L - W(W-1)/2), HSA 4 Hq d S x (valid selected slots), chunk encoder
4 Hq d (S+1)^2 per chunk, each forward and x3.5 for forward + backward (FlashAttention convention).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import format_table, profile_one_step, record  # noqa: E402

H100_BF16_PEAK = 989.0
RESULTS = os.path.join(ROOT, "benchmarks", "results", "model_step.jsonl")

# name: (yaml, overrides, micro-batch, sequence length[, packed document length])
MODELS = {
    "swa_hsa_345m": ("swa_hsa_345m.yaml", {}, 1, 8192),
    "gpt_345m_full": ("gpt_345m_full.yaml", {}, 1, 8192),
    "gpt_345m_swa": ("gpt_345m_swa.yaml", {}, 1, 8192),
    # Two layers of the 8B-A1B: the first HSA layer (chunk encoder + retrieval + HSA with inner SWA, MoE) and one
    # SWA+MoE layer, with the full vocabulary.
    "moe_8b_a1b_2layer": ("moe_8b_a1b_swa_hsa.yaml", {"num_layers": 2, "layer_pattern": "[hsa swa]"}, 1, 8192),
    "drt_128m": ("drt_128m.yaml", {}, 1, 16640),
    # Packed batches: 4 documents of 2048 tokens per 8K sample (document masks in every attention, per-document
    # retrieval).
    "swa_hsa_345m_packed": ("swa_hsa_345m.yaml", {}, 1, 8192, 2048),
    # The 8B-A1B slice with a 1024-wide retrieval head (instead of 2048), for the Triton retrieval's size limits.
    "moe_8b_a1b_2layer_dr1024": (
        "moe_8b_a1b_swa_hsa.yaml", {"num_layers": 2, "layer_pattern": "[hsa swa]", "hsa_retrieval_dim": 1024}, 1, 8192,
    ),
}
DEFAULT_MODELS = ["swa_hsa_345m", "gpt_345m_full", "gpt_345m_swa", "moe_8b_a1b_2layer", "drt_128m"]


def attention_flops_forward(config, L: int, doc_len: int | None = None) -> float:
    """Forward attention FLOPs of one sequence of L tokens (matmuls of scores and values only); packed documents
    of doc_len tokens attend within themselves only."""
    if doc_len is not None:
        return (L // doc_len) * attention_flops_forward(config, doc_len)
    Hq, d = config.num_attention_heads, config.kv_channels
    S, K, W = config.hsa_chunk_size, config.hsa_topk, config.swa_window_size

    def window(w):
        w = min(w, L - 1)
        return 4 * Hq * d * ((w + 1) * L - w * (w + 1) / 2)

    full = 2 * L * L * Hq * d
    # valid HSA slots summed over tokens: min(K, floor(t / S)) for t < L
    hsa_slots = sum(min(K, t // S) for t in range(L))
    total = 0.0
    for plan in config.layer_plans:
        if plan.kind == "full":
            total += full
        elif plan.kind == "swa":
            total += window(W)
        elif plan.kind == "hsa":
            total += 4 * Hq * d * S * hsa_slots
            if config.hsa_inner_swa:
                total += window(config.hsa_inner_window_size or W)
        elif plan.kind == "gca":
            total += window(W) + 4 * Hq * d * S * sum(min(K, max(0, t // S - 1)) for t in range(0, L, S)) * S
        if plan.memory_builder:
            C = L // S
            total += config.hsa_encoder_layers * 4 * Hq * d * (S + 1) ** 2 * C
    return total


def build(name: str, device, **extra):
    from megatron_ext.models import build_model, config_from_yaml

    yaml_name, overrides, batch, seq = MODELS[name][:4]
    # The fusions pretrain_hsa.py gets from Megatron-LM's flag defaults (--bias-swiglu-fusion,
    # --bias-dropout-fusion: torch.compile'd element-wise code), so that a step here is the step of training.
    fusions = dict(bias_activation_fusion=True, bias_dropout_fusion=True)
    config = config_from_yaml(
        os.path.join(ROOT, "examples", yaml_name), bf16=True, params_dtype="bfloat16", seq_length=seq,
        use_cpu_initialization=False, **{**fusions, **overrides, **extra},
    )
    # Megatron-LM pads the vocabulary to a multiple of 128 (--make-vocab-size-divisible-by); unpadded (100,278) the
    # output layer's matmuls fall back to slower kernels
    padded = -(-config.vocab_size // 128) * 128
    model = build_model(config, vocab_size=padded).to(device)
    return config, model, batch, seq


def time_steps(model, config, batch, seq, steps, warmup, device, doc_len=None, fused_adam=False, profile=None):
    from megatron_ext.layers.packing import packed_seq_params

    packed = None
    if doc_len is not None:
        packed = packed_seq_params(torch.arange(0, batch * seq + 1, doc_len, device=device, dtype=torch.int32), seq)
    vocab = model.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-3,
                            fused=fused_adam or None)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(tokens, positions, None, labels=labels, packed_seq_params=packed).float().mean()
        loss.backward()
        torch.cuda.synchronize()
        t_opt = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        return loss, time.perf_counter() - t_opt

    losses, times, opt_times = [], [], []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, opt_s = step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= warmup:
            times.append(dt)
            opt_times.append(opt_s)
        else:
            print(f"    warm-up step {i}: {dt * 1e3:.0f} ms, loss {losses[-1]:.4f}", flush=True)
    if profile:
        profile_one_step(step, profile)
    return statistics.median(times), statistics.median(opt_times), losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: the model's)")
    parser.add_argument("--fused-adam", action="store_true", help="torch's fused AdamW instead of its foreach one")
    parser.add_argument("--fused-kernels", choices=["auto", "reference", "both"], default="auto",
                        help="RMSNorm and cross entropy: the Triton kernels of megatron_ext.kernels.fused ('auto'), "
                             "PyTorch / megatron's own ('reference'), or each model timed both ways, side by side")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="profile one more step per model; kernel tables go to DIR/profile_<model>.txt")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("model_step.py needs a CUDA GPU")

    from megatron_ext.compat import cpu as cpu_compat
    from megatron_ext.models.summary import count_parameters
    from megatron_ext.testing import initialize_megatron_parallel

    cpu_compat.init_process_group(0, 1, port=cpu_compat.free_port())
    initialize_megatron_parallel(seed=1234)
    device = torch.device("cuda")
    command = "python benchmarks/model_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    # If a retrieval model fails on the Triton kernels, it is timed again on the PyTorch reference kernels.
    fused = ["reference", "auto"] if args.fused_kernels == "both" else [args.fused_kernels]
    todo = [(name, {} if f == "auto" else {"fused_kernel_backend": f}) for name in args.models for f in fused]
    while todo:
        name, extra = todo.pop(0)
        label = name + ("" if not extra else "+" + ",".join(f"{k}={v}" for k, v in extra.items()))
        print(f"== {label}", flush=True)
        row = {"bench": "model_step", "model": label, "command": command}
        try:
            torch.cuda.reset_peak_memory_stats()
            config, model, batch, seq = build(name, device, **extra)
            batch = args.micro_batch or batch
            total, active = count_parameters(model, config)
            doc_len = MODELS[name][4] if len(MODELS[name]) > 4 else None
            profile = os.path.join(args.profile, f"profile_{label}.txt") if args.profile else None
            step_s, opt_s, losses = time_steps(model, config, batch, seq, args.steps, args.warmup, device, doc_len,
                                               fused_adam=args.fused_adam, profile=profile)
            tokens = batch * seq
            flop = 6 * tokens * active + 3.5 * batch * attention_flops_forward(config, seq, doc_len)
            row.update(
                pattern=config.layer_pattern, micro_batch=batch, seq_length=seq, tokens_per_step=tokens,
                packed_doc_len=doc_len,
                params_total=total, params_active=active, step_ms=step_s * 1e3, optimizer_ms=opt_s * 1e3,
                fused_adam=args.fused_adam, tokens_per_s=tokens / step_s,
                model_tflops=flop / step_s / 1e12, mfu=flop / step_s / 1e12 / H100_BF16_PEAK,
                peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, first_loss=losses[0], last_loss=losses[-1],
                status="ok",
            )
            del model
        except Exception as exc:  # one failing model must not hide the others' numbers
            traceback.print_exc()
            row.update(status=f"error: {type(exc).__name__}: {str(exc)[:300]}")
            if "hsa_kernel_backend" not in extra and not name.startswith("gpt_"):
                todo.insert(0, (name, {**extra, "hsa_kernel_backend": "reference"}))
            model = None
        torch.cuda.empty_cache()
        rows.append(record(args.out, **row))
        print(format_table([rows[-1]], ["model", "tokens_per_step", "step_ms", "tokens_per_s", "model_tflops",
                                        "mfu", "peak_mem_gib", "status"]), flush=True)
    print()
    print(format_table(rows, ["model", "params_total", "params_active", "tokens_per_step", "step_ms", "optimizer_ms",
                              "tokens_per_s",
                              "model_tflops", "mfu", "peak_mem_gib", "status"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
