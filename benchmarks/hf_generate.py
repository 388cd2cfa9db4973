"""Generation with the Hugging Face model (``megatron_ext.hf``): decode steps with its cache against recomputing.

For a model of ``examples/*.yaml`` at random weights (bf16, one GPU, batch 1) and each prompt length L (text tokens:
DRT's model inserts a landmark after every 63 of them itself):

- prefill: the forward of the L-token prompt that fills the cache (``use_cache=True``);
- cached step: one new token against the cache (median of ``--new-tokens`` steps, CUDA-synchronised wall clock:
  a step is many small launches, so the host is part of its cost);
- uncached step: one forward of the whole L + 1 tokens, what each new token costs without a cache;
- check: after the steps, the last step's logits and those of the whole sequence's bf16 forward, each against the
  same forward of an fp32 copy of the model (relative difference: the cache should add no error of its own);
  cache GiB: what the cache holds then.

    python benchmarks/hf_generate.py --model swa_hsa_345m --prompt-lens 4096 16384 65536 --out $OUT/hf_generate.jsonl
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, environment, format_table, record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"swa_hsa_345m": "swa_hsa_345m.yaml", "gpt_345m_swa": "gpt_345m_swa.yaml", "gpt_345m_full": "gpt_345m_full.yaml",
          "drt_128m": "drt_128m.yaml"}
# models trained on data with landmark tokens: their id (drt_128m.yaml's vocabulary ends with it); the model inserts
# them, the prompts are text
LANDMARKS = {"drt_128m": 50264}


def build(name: str, seq_length: int, device: str = "cuda"):
    from megatron_ext.hf import HSAGPTConfig, HSAGPTForCausalLM
    from megatron_ext.hf.convert import hf_config_fields
    from megatron_ext.models import config_from_yaml

    config = config_from_yaml(os.path.join(ROOT, "examples", MODELS[name]), seq_length=seq_length)
    fields = hf_config_fields(config, config.vocab_size, landmark_token_id=LANDMARKS.get(name))
    torch.manual_seed(0)
    model = HSAGPTForCausalLM(HSAGPTConfig(**fields)).to(device, torch.bfloat16).eval()
    return model


def _cache_gib(cache) -> float:
    def nbytes(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        items = x.values() if isinstance(x, dict) else x  # a GCA layer's retrieval state, its selection pair
        return sum(nbytes(item) for item in items)

    return sum(nbytes(state) for state in cache.layers.values()) / 2**30


def _text_ids(model) -> int:
    """Prompt ids lie below this: the vocabulary, or a landmark model's landmark id (never a text token)."""
    landmark = model.config.landmark_token_id
    return model.config.vocab_size if landmark is None else landmark


@torch.no_grad()
def measure(model, reference, prompt_len: int, new_tokens: int) -> dict:
    device = model.device
    tokens = torch.randint(0, _text_ids(model), (1, prompt_len + new_tokens),
                           generator=torch.Generator().manual_seed(prompt_len))
    tokens = tokens.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompt = tokens[:, :prompt_len]
    prefill_ms = bench_ms(lambda: model(prompt, use_cache=True), warmup=5, rep=20)
    cache = model(prompt, use_cache=True).past_key_values
    steps, logits = [], None
    for t in range(prompt_len, prompt_len + new_tokens):
        sync()
        start = time.perf_counter()
        logits = model(tokens[:, t:t + 1], past_key_values=cache).logits[:, -1].float()
        sync()
        steps.append((time.perf_counter() - start) * 1e3)
    full = model(tokens).logits[:, -1].float()
    exact = reference(tokens).logits[:, -1]
    uncached_ms = bench_ms(lambda: model(tokens[:, :prompt_len + 1]), warmup=5, rep=20)
    cached_ms = statistics.median(steps[2:] if len(steps) > 4 else steps)  # the first steps warm up
    return dict(prompt_len=prompt_len, new_tokens=new_tokens, prefill_ms=prefill_ms, cached_step_ms=cached_ms,
                uncached_step_ms=uncached_ms, speedup=uncached_ms / cached_ms,
                cached_vs_fp32=_relative(logits, exact), uncached_vs_fp32=_relative(full, exact),
                cache_gib=_cache_gib(cache))


def _relative(got, exact) -> float:
    keep = torch.isfinite(exact)  # a landmark model's landmark logit is -inf
    return float((got[keep] - exact[keep]).norm() / exact[keep].norm())


@torch.no_grad()
def profile_steps(model, prompt_len: int, steps: int = 8) -> None:
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.randint(0, _text_ids(model), (1, prompt_len + steps + 2), device=model.device)
    cache = model(tokens[:, :prompt_len], use_cache=True).past_key_values
    for t in range(prompt_len, prompt_len + 2):  # warm-up steps
        model(tokens[:, t:t + 1], past_key_values=cache)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for t in range(prompt_len + 2, prompt_len + 2 + steps):
            model(tokens[:, t:t + 1], past_key_values=cache)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    print(f"profile of {steps} cached steps after a {prompt_len}-token prompt")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swa_hsa_345m", choices=list(MODELS))
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="append one JSON object per prompt length to this .jsonl")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a (slow) try of the script")
    parser.add_argument("--band-block", type=int, default=None,
                        help="query rows per step of the sliding-window prefill (megatron_ext.hf's BAND_BLOCK); "
                             "0: the whole prompt in one step against one [s, s] band mask (the code before the "
                             "banded prefill)")
    parser.add_argument("--profile", action="store_true",
                        help="then profile 8 cached steps at the first prompt length: ops by CPU and GPU time")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("hf_generate.py: no CUDA GPU here (--device cpu runs it slowly on the CPU)")
    if args.new_tokens < 1:
        raise SystemExit("--new-tokens must be at least 1")
    if args.band_block is not None:
        from megatron_ext.hf import modeling_hsa_gpt

        modeling_hsa_gpt.BAND_BLOCK = args.band_block or (max(args.prompt_lens) + args.new_tokens)
    longest = max(args.prompt_lens) + args.new_tokens
    model = build(args.model, -(-longest // 1024) * 1024, args.device)  # megatron's seq_length: whole chunks
    reference = copy.deepcopy(model).float()
    command = "python benchmarks/hf_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for length in args.prompt_lens:
        from megatron_ext.hf import modeling_hsa_gpt

        row = dict(bench="hf_generate", model=args.model, dtype="bfloat16", band_block=modeling_hsa_gpt.BAND_BLOCK,
                   **measure(model, reference, length, args.new_tokens))
        rows.append(row)
        if args.out:
            record(args.out, **row, command=command)
    if args.profile:
        profile_steps(model, args.prompt_lens[0])
    print(environment()["gpu"])
    print(format_table(rows, ["prompt_len", "band_block", "prefill_ms", "cached_step_ms", "uncached_step_ms", "speedup",
                              "cached_vs_fp32", "uncached_vs_fp32", "cache_gib"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
