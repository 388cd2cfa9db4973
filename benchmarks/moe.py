"""MoE training throughput without Transformer Engine: grouped-GEMM experts against megatron-core's SequentialMLP.

The model is a 2-layer slice of an 8B-A1B-like MoE (performance.md section 6): hidden 2048, 16 query / 4 KV heads
(head dim 128), RMSNorm, RoPE, SwiGLU experts, 64 experts top-8 of FFN 1024 plus a 2048 shared expert, vocab 128256,
alltoall dispatcher, aux-loss balancing. It trains with megatron-core's own machinery (bf16 ``Float16Module``, DDP,
distributed optimizer with torch's fused AdamW as in ``pretrain_hsa.py`` (``--no-fused-adam``: megatron's foreach
fallback), ``forward_backward_no_pipelining`` over 4 micro-batches) with a torch-SDPA core attention
(megatron's local ``DotProductAttention`` materialises s x s scores). Both expert modules run in this one process
on the same shapes and data; only the spec's experts slot differs.

Sections (each prints a table; every row is appended to ``--out``):
1. ``check``: grouped GEMM in bf16 against an fp32 loop, uneven and empty expert loads, forward and gradients.
2. ``experts``: the expert computation alone (E experts, T*topk routed rows), forward+backward.
3. ``moe_layer``: one MoELayer (router, dispatcher, experts, shared expert), forward+backward.
4. ``train``: training steps of the 2-layer slice at each sequence length: tokens/s, TFLOP/s, peak memory; each
   variant (``VARIANTS``: experts module, token permutation, shared-expert overlap, core attention) in a fresh
   process (``--no-isolate`` to keep one), optionally with a torch.profiler table of one step (``--profile DIR``).

FLOPs count only active parameters, 6 per parameter per token (forward + backward): attention projections, router,
top-k routed experts, shared expert and output layer; the attention score FLOPs (which grow with the sequence) are
reported apart (``attn_tflops``) and are not in ``tflops``.

    python benchmarks/moe.py                       # on the H100: all sections, 4K and 8K tokens
    python benchmarks/moe.py --tiny --sections check,train   # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, format_table, profile_one_step, record  # noqa: E402
from megatron_ext.compat import cpu as cpu_compat  # noqa: E402

EXPERT_KINDS = ("grouped_gemm", "sequential")
# name -> (experts slot, device-side token permutation, shared expert overlapped on a side stream, core attention)
# Core attention: "project" = megatron_ext.layers.core_attention.LocalCoreAttention (SDPA with enable_gqa, which
# only the flash backend serves); "cudnn" = SDPA on K/V expanded to all query heads with the cuDNN backend first.
VARIANTS = {
    "grouped": ("grouped_gemm", True, False, "project"),
    "grouped+overlap": ("grouped_gemm", True, True, "project"),
    "grouped/megatron-dispatcher": ("grouped_gemm", False, False, "project"),
    "grouped+cudnn-attention": ("grouped_gemm", True, False, "cudnn"),
    "sequential": ("sequential", False, False, "project"),
}
BASELINE = "sequential"


# ----------------------------------------------------------------------------------------------------------------
# Shapes and FLOPs
# ----------------------------------------------------------------------------------------------------------------
def model_shape(args) -> dict:
    if args.tiny:
        return dict(hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8, topk=2, ffn=32, shared_ffn=64, vocab=512)
    return dict(hidden=2048, heads=16, kv_heads=4, head_dim=128, experts=64, topk=8, ffn=1024, shared_ffn=2048,
                vocab=128256)


def active_params_per_token(shape: dict, layers: int) -> int:
    """Matmul parameters one token passes through (embedding lookup excluded)."""
    h, d = shape["hidden"], shape["head_dim"]
    attention = h * (shape["heads"] + 2 * shape["kv_heads"]) * d + shape["heads"] * d * h
    router = h * shape["experts"]
    routed = shape["topk"] * 3 * h * shape["ffn"]  # SwiGLU: gate, up, down
    shared = 3 * h * shape["shared_ffn"]
    return layers * (attention + router + routed + shared) + h * shape["vocab"]


def attention_flops_per_token(shape: dict, layers: int, seq_len: int) -> float:
    """Causal attention scores and values, forward + backward (3x forward), averaged over positions."""
    return layers * 3 * 2 * 2 * (seq_len / 2) * shape["heads"] * shape["head_dim"]


# ----------------------------------------------------------------------------------------------------------------
# Megatron setup
# ----------------------------------------------------------------------------------------------------------------
def init_megatron():
    from megatron_ext.testing import initialize_megatron_parallel

    cpu_compat.apply()
    cpu_compat.init_process_group(0, 1, port=cpu_compat.free_port())
    initialize_megatron_parallel(seed=1234)


def make_config(args, shape, *, shared_expert_overlap: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return TransformerConfig(
        num_layers=args.layers,
        hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"],
        num_query_groups=shape["kv_heads"],
        kv_channels=shape["head_dim"],
        ffn_hidden_size=4 * shape["hidden"],
        num_moe_experts=shape["experts"],
        moe_router_topk=shape["topk"],
        moe_ffn_hidden_size=shape["ffn"],
        moe_shared_expert_intermediate_size=shape["shared_ffn"],
        moe_shared_expert_overlap=shared_expert_overlap,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-3,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=torch.cuda.is_available(),
        bias_dropout_fusion=torch.cuda.is_available(),
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02,
        # megatron's torch.compile'd cross entropy (no TE): fewer passes over the [s, b, 128256] logits.
        cross_entropy_loss_fusion=args.cross_entropy_fusion,
        cross_entropy_fusion_impl="native",
    )


def sdpa_core_attention(kind: str = "project"):
    """The project's SDPA core attention (``kind="project"``, when present), else :class:`ExpandedKVAttention`."""
    if kind == "project":
        try:
            from megatron_ext.layers.core_attention import LocalCoreAttention

            return LocalCoreAttention
        except Exception:  # noqa: BLE001 - the layer may not exist in this checkout
            pass
    return ExpandedKVAttention


class ExpandedKVAttention(torch.nn.Module):
    """Causal SDPA core attention with K/V repeated to every query head, so that SDPA may pick cuDNN (its GQA
    flag is honoured by the flash backend only); cuDNN first, then flash and memory-efficient, on CUDA."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__()
        self.scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, /, *, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        sq, b, hq, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != hq:
            k, v = (t.repeat_interleave(hq // t.shape[1], dim=1) for t in (k, v))
        out = _sdpa_prefer_cudnn(q, k, v, self.scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)


def _sdpa_prefer_cudnn(q, k, v, scale):
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        try:
            context = sdpa_kernel(order, set_priority=True)
        except TypeError:  # torch without backend priorities
            context = sdpa_kernel(order)
        with context:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def build_gpt(config, shape, variant: str, seq_len: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ext.layers.moe_experts import get_moe_spec

    spec = get_gpt_layer_local_spec(num_experts=shape["experts"], moe_grouped_gemm=False, normalization="RMSNorm")
    experts, device_permutation, _, attention = VARIANTS[variant]
    spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention(attention)
    spec.submodules.mlp = get_moe_spec(experts, device_permutation=device_permutation)
    return GPTModel(
        config,
        spec,
        vocab_size=shape["vocab"],
        max_sequence_length=seq_len,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_gib(peak=True) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30


# ----------------------------------------------------------------------------------------------------------------
# 1. correctness of the grouped GEMM on this device
# ----------------------------------------------------------------------------------------------------------------
def section_check(args, shape, out_path):
    from megatron_ext.layers.moe_experts import grouped_gemm, grouped_gemm_backend

    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    e, k, m = shape["experts"], shape["hidden"], 2 * shape["ffn"]
    counts = torch.randint(0, 200, (e,))
    counts[::7] = 0  # empty experts
    counts[1] = 1
    n = int(counts.sum())
    x = torch.randn(n, k, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(e, m, k, device=dev, dtype=dtype) / math.sqrt(k)).requires_grad_()
    backend = grouped_gemm_backend(x, w)
    y = grouped_gemm(x, w, counts.to(dev), backend="auto")
    dy = torch.randn_like(y)
    y.backward(dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y32 = grouped_gemm(x32, w32, counts, backend="loop")
    y32.backward(dy.float())

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm().clamp_min(1e-30))

    row = dict(section="check", backend=backend, dtype=str(dtype).replace("torch.", ""), rows=n, experts=e,
               empty_experts=int((counts == 0).sum()), rel_err_y=rel(y, y32), rel_err_dx=rel(x.grad, x32.grad),
               rel_err_dw=rel(w.grad, w32.grad),
               empty_expert_dw_max=float(w.grad[counts.to(dev) == 0].abs().max()) if (counts == 0).any() else 0.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    row["ok"] = bool(max(row["rel_err_y"], row["rel_err_dx"], row["rel_err_dw"]) < tol and
                     row["empty_expert_dw_max"] == 0.0)
    record(out_path, **row)
    print(format_table([row], list(row)))
    return [row]


# ----------------------------------------------------------------------------------------------------------------
# 2. the experts alone / 3. one MoE layer
# ----------------------------------------------------------------------------------------------------------------
def routed_counts(tokens: int, shape, generator) -> torch.Tensor:
    """Tokens per expert of a random top-k routing (uneven, as a real router's)."""
    logits = torch.randn(tokens, shape["experts"], generator=generator)
    top = logits.topk(shape["topk"], dim=-1).indices
    return torch.bincount(top.flatten(), minlength=shape["experts"])


def section_experts(args, shape, out_path):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_ext.layers.moe_experts import get_moe_spec

    rows = []
    tokens = args.seq_lengths[0]
    pg = ProcessGroupCollection.use_mpu_process_groups()
    counts = routed_counts(tokens, shape, torch.Generator().manual_seed(0))
    n = int(counts.sum())
    flop = 6 * n * 3 * shape["hidden"] * shape["ffn"]
    for kind in EXPERT_KINDS:
        config = make_config(args, shape, shared_expert_overlap=False)
        experts = get_moe_spec(kind).keywords["submodules"].experts(shape["experts"], config, pg_collection=pg)
        experts = experts.to(device(), config.params_dtype)
        x = torch.randn(n, shape["hidden"], device=device(), dtype=config.params_dtype, requires_grad=True)
        probs = torch.rand(n, device=device(), dtype=torch.float32, requires_grad=True)
        dy = torch.randn(n, shape["hidden"], device=device(), dtype=config.params_dtype)

        def fwd():
            return experts(x, counts, probs)[0]

        def fwd_bwd():
            x.grad = None
            experts.zero_grad(set_to_none=True)
            fwd().backward(dy)

        with torch.no_grad():
            f_ms = bench_ms(fwd, warmup=args.warmup_ms, rep=args.rep_ms)
        fb_ms = bench_ms(fwd_bwd, warmup=args.warmup_ms, rep=args.rep_ms)
        row = dict(section="experts", experts=kind, rows=n, fwd_ms=f_ms, fwd_bwd_ms=fb_ms,
                   fwd_tflops=flop / 3 / (f_ms * 1e-3) / 1e12, fwd_bwd_tflops=flop / (fb_ms * 1e-3) / 1e12)
        rows.append(row)
        del experts, x, probs, dy
        free_memory()
    _add_speedup(rows, "fwd_bwd_ms")
    for row in rows:
        record(out_path, **row)
    print(format_table(rows, list(rows[0])))
    return rows


def section_moe_layer(args, shape, out_path):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_ext.layers.moe_experts import get_moe_spec

    rows = []
    pg = ProcessGroupCollection.use_mpu_process_groups()
    tokens = args.seq_lengths[0]
    for variant in args.layer_variants:
        kind, device_permutation, overlap, _ = VARIANTS[variant]
        config = make_config(args, shape, shared_expert_overlap=overlap)
        try:
            spec = get_moe_spec(kind, device_permutation=device_permutation)
            layer = spec(config=config, pg_collection=pg).to(device(), config.params_dtype)
            layer.set_layer_number(1)
            x = torch.randn(tokens, 1, shape["hidden"], device=device(), dtype=config.params_dtype,
                            requires_grad=True)
            dy = torch.randn_like(x)

            def fwd_bwd():
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x)[0].backward(dy)

            ms = bench_ms(fwd_bwd, warmup=args.warmup_ms, rep=args.rep_ms)
            flop = 6 * tokens * (shape["hidden"] * shape["experts"] + shape["topk"] * 3 * shape["hidden"] *
                                 shape["ffn"] + 3 * shape["hidden"] * shape["shared_ffn"])
            row = dict(section="moe_layer", variant=variant, tokens=tokens, fwd_bwd_ms=ms,
                       fwd_bwd_tflops=flop / (ms * 1e-3) / 1e12)
        except Exception as exc:  # noqa: BLE001 - record and go on with the other variants
            traceback.print_exc()
            row = dict(section="moe_layer", variant=variant, tokens=tokens, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
        layer = x = dy = None
        free_memory()
    _add_speedup(rows, "fwd_bwd_ms")
    for row in rows:
        record(out_path, **row)
    cols = ["section", "variant", "tokens", "fwd_bwd_ms", "fwd_bwd_tflops", "speedup_vs_sequential", "error"]
    print(format_table(rows, cols))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 4. training steps
# ----------------------------------------------------------------------------------------------------------------
def train_variant(args, shape, variant: str, seq_len: int) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # The schedules set the aux-loss scale as a [1] tensor; a stand-alone MoE backward earlier in this process
    # created it as a scalar, which megatron then cannot copy into.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    base_gib = memory_gib(peak=False)
    config = make_config(args, shape, shared_expert_overlap=VARIANTS[variant][2])
    torch.manual_seed(1234)
    model = build_gpt(config, shape, variant, seq_len).to(device())
    if config.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=True)
    model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.1, bf16=config.bf16, params_dtype=config.params_dtype,
                        use_distributed_optimizer=True, clip_grad=1.0),
        [model],
    )
    if args.fused_adam:
        from megatron_ext.training.fused_adam import use_fused_adam

        use_fused_adam(optimizer)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    forward_backward = get_forward_backward_func()

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape["vocab"], (args.micro_batch_size, seq_len + 1), generator=gen).to(device())
               for _ in range(args.micro_batches)]
    position_ids = torch.arange(seq_len, device=device()).unsqueeze(0).expand(args.micro_batch_size, -1)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        loss = model(tokens, position_ids, None, labels=labels)

        def loss_func(output):
            total = output.float().sum()
            count = torch.tensor(output.numel(), device=output.device, dtype=torch.int)
            return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

        return loss, loss_func

    step_times, optimizer_times, losses = [], [], []
    for step in range(args.warmup_steps + args.steps):
        sync()
        t0 = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                                   num_microbatches=args.micro_batches, seq_length=seq_len,
                                   micro_batch_size=args.micro_batch_size, forward_only=False)
        if args.phase_times:
            sync()
            t_opt = time.perf_counter()
        optimizer.step()
        sync()
        if step >= args.warmup_steps:
            step_times.append(time.perf_counter() - t0)
            if args.phase_times:
                optimizer_times.append(time.perf_counter() - t_opt)
        stats = torch.stack([r["lm loss"] for r in reduced]).sum(0)
        losses.append(float(stats[0] / stats[1]))

    if args.profile:
        name = f"profile_{variant.replace('/', '_').replace('+', '_')}_{seq_len}.txt"
        profile_one_step(lambda: (
            model.zero_grad_buffer(), optimizer.zero_grad(),
            forward_backward(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                             num_microbatches=args.micro_batches, seq_length=seq_len,
                             micro_batch_size=args.micro_batch_size, forward_only=False),
            optimizer.step(),
        ), os.path.join(args.profile, name))

    tokens_per_step = args.micro_batches * args.micro_batch_size * seq_len
    step_s = statistics.median(step_times)
    flop_per_token = 6 * active_params_per_token(shape, args.layers)
    row = dict(
        section="train", variant=variant, seq_len=seq_len,
        micro_batches=args.micro_batches, micro_batch_size=args.micro_batch_size, tokens_per_step=tokens_per_step,
        step_ms=step_s * 1e3, step_ms_min=min(step_times) * 1e3, step_ms_max=max(step_times) * 1e3,
        tokens_per_s=tokens_per_step / step_s,
        tflops=flop_per_token * tokens_per_step / step_s / 1e12,
        attn_tflops=attention_flops_per_token(shape, args.layers, seq_len) * tokens_per_step / step_s / 1e12,
        peak_gib=memory_gib(), peak_above_start_gib=memory_gib() - base_gib,
        active_params_per_token=active_params_per_token(shape, args.layers),
        first_loss=losses[0], last_loss=losses[-1], fused_adam=args.fused_adam,
    )
    if optimizer_times:
        row["optimizer_ms"] = statistics.median(optimizer_times) * 1e3
    if torch.cuda.is_available():
        row["mfu_vs_989"] = row["tflops"] / 989.0
    del model, optimizer, batches
    config.finalize_model_grads_func = config.no_sync_func = None
    free_memory()
    return row


def section_train(args, shape, out_path):
    rows = []
    for index, seq_len in enumerate(args.seq_lengths):
        variants = args.train_variants if index == 0 else args.train_variants_longer
        for variant in variants:
            try:
                row = train_variant_isolated(args, variant, seq_len) if args.isolate else train_variant(
                    args, shape, variant, seq_len
                )
            except Exception as exc:  # noqa: BLE001 - record and go on with the other variants
                traceback.print_exc()
                row = dict(section="train", variant=variant, seq_len=seq_len,
                           error=f"{type(exc).__name__}: {exc}"[:500])
                free_memory()
            rows.append(row)
            _add_speedup([r for r in rows if r.get("seq_len") == seq_len], "step_ms")
            record(out_path, **row)  # now: a run cut short keeps the rows it finished
            print(format_table([row], [c for c in TRAIN_COLUMNS if c in row]), flush=True)
    print(format_table(rows, TRAIN_COLUMNS + ["speedup_vs_sequential"]))
    return rows


def train_variant_isolated(args, variant: str, seq_len: int) -> dict:
    """``train_variant`` in a fresh process: megatron's DDP keeps its model alive through autograd hooks (a
    reference cycle through C++ nodes that gc cannot collect), so models trained one after another in one process
    pile up in GPU memory; a process per variant gives each the same empty GPU and an exact peak memory."""
    import json
    import subprocess

    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, str(seq_len),
               "--layers", str(args.layers), "--micro-batches", str(args.micro_batches),
               "--micro-batch-size", str(args.micro_batch_size), "--warmup-steps", str(args.warmup_steps),
               "--steps", str(args.steps)]
    if args.tiny:
        command.append("--tiny")
    if args.profile:
        command += ["--profile", args.profile]
    if not args.cross_entropy_fusion:
        command.append("--no-cross-entropy-fusion")
    command.append("--fused-adam" if args.fused_adam else "--no-fused-adam")
    if args.phase_times:
        command.append("--phase-times")
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.worker_timeout_s)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (done.stdout + done.stderr)[-1500:]
    raise RuntimeError(f"worker exited with {done.returncode} and no result; output tail:\n{tail}")


RESULT_PREFIX = "MOE_BENCH_RESULT "

TRAIN_COLUMNS = ["variant", "seq_len", "fused_adam", "step_ms", "optimizer_ms", "tokens_per_s", "tflops", "attn_tflops",
                 "peak_gib", "first_loss", "last_loss", "error"]


def _add_speedup(rows, time_key):
    base = [r for r in rows if (r.get("variant") or r.get("experts")) == BASELINE and time_key in r]
    if not base:
        return
    for row in rows:
        if time_key in row:
            row["speedup_vs_sequential"] = base[0][time_key] / row[time_key]


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="check,experts,moe_layer,train")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=None)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--layer-variants", nargs="+", choices=list(VARIANTS),
                        default=["grouped", "grouped+overlap", "grouped/megatron-dispatcher", "sequential"])
    parser.add_argument("--train-variants", nargs="+",
                        default=["grouped", "grouped/megatron-dispatcher", "grouped+cudnn-attention", "sequential"],
                        choices=list(VARIANTS),
                        help="variants trained at the first sequence length")
    parser.add_argument("--train-variants-longer", nargs="+", default=["grouped", "sequential"],
                        choices=list(VARIANTS), help="variants trained at the other sequence lengths")
    parser.add_argument("--no-cross-entropy-fusion", dest="cross_entropy_fusion", action="store_false",
                        help="use megatron's unfused vocab-parallel cross entropy")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="profile one extra training step per variant; kernel tables are written to DIR")
    parser.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True,
                        help="torch's fused AdamW inside megatron's optimizer, as pretrain_hsa.py uses by default "
                             "(megatron_ext.training.fused_adam); --no-fused-adam keeps megatron's foreach fallback")
    parser.add_argument("--phase-times", action="store_true",
                        help="synchronize before the optimizer step and report its time apart (optimizer_ms)")
    parser.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke test")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "moe.jsonl"))
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="train every variant in this process (peak memory then includes earlier models)")
    parser.add_argument("--worker-timeout-s", type=float, default=300.0)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker_main(args)
    if args.seq_lengths is None:
        args.seq_lengths = [64] if args.tiny else [4096, 8192]
    if args.tiny:
        args.steps, args.warmup_steps, args.micro_batches = 2, 1, 2
        args.warmup_ms, args.rep_ms = 1, 1
    shape = model_shape(args)
    init_megatron()
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; torch {torch.__version__}"
          f"; shape {shape}; layers {args.layers}", flush=True)
    sections = {"check": section_check, "experts": section_experts, "moe_layer": section_moe_layer,
                "train": section_train}
    for name in args.sections.split(","):
        print(f"\n== {name} ==", flush=True)
        try:
            sections[name](args, shape, args.out)
        except Exception:  # noqa: BLE001 - a failing section must not hide the others
            traceback.print_exc()


def worker_main(args):
    import json

    variant, seq_len = args.worker[0], int(args.worker[1])
    if args.tiny:
        args.warmup_ms, args.rep_ms = 1, 1
    init_megatron()
    row = train_variant(args, model_shape(args), variant, seq_len)
    print(RESULT_PREFIX + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
