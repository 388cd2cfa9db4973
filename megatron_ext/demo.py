"""`make demo`: train a tiny megatron-core GPT for a few steps on whatever machine this is (CPU is fine).

Prints the loss of every step and where its outputs went.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from megatron_ext.compat import cpu as cpu_compat
from megatron_ext.testing import initialize_megatron_parallel, teardown_megatron_parallel


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output-dir", default="outputs/demo")
    args = parser.parse_args(argv)

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cpu_compat.apply()
    cpu_compat.init_process_group()
    initialize_megatron_parallel(seed=1234)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    vocab, seq, batch = 256, 64, 4
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
    )
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=vocab, max_sequence_length=seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # A learnable toy stream: each token is the previous one plus one (mod vocab).
    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    tokens = (start + torch.arange(seq + 1)) % vocab
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(seq).expand(batch, seq)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]

    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "losses.jsonl")
    with open(log_path, "w") as log:
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss = model(inputs, position_ids, causal, labels=labels).float().mean()
            loss.backward()
            optimizer.step()
            elapsed = time.perf_counter() - t0
            print(f"step {step:3d} | lm loss {loss.item():.4f} | {batch * seq / elapsed:,.0f} tokens/s", flush=True)
            log.write(json.dumps({"step": step, "lm_loss": loss.item()}) + "\n")
    print(f"demo outputs: per-step losses in {os.path.abspath(log_path)}")
    teardown_megatron_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
