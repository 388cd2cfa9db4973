#!/usr/bin/env python
"""Convert a pretrain_hsa.py checkpoint into a Hugging Face model directory.

    python tools/convert_checkpoint_to_hf.py --load checkpoints/swa_hsa_345m --save hf/swa_hsa_345m \\
        [--iteration N] [--dtype bf16|fp16|fp32] [--tokenizer-files tokenizer.json tokenizer_config.json]

Reads the checkpoint's saved arguments, builds the whole model on the CPU (any tensor/pipeline layout of a
``torch_dist`` checkpoint is resharded to one rank; a ``torch`` checkpoint must come from one rank) and writes
config.json, model.safetensors and the model code. Load it with

    AutoModelForCausalLM.from_pretrained("hf/swa_hsa_345m", trust_remote_code=True)

(the model code imports ``megatron_ext`` for the HSA/GCA kernels: install this package where it runs). Converts
models of full, swa, hsa and gca layers, dense or MoE, RoPE or ALiBi; MoE token dropping, group-limited routing and a
gated shared expert are refused with the reason. A GCA model trained on data with landmark tokens
(``--data-landmark-chunk-size``) takes text: it inserts the landmarks itself. The conversion runs on the CPU even on
a GPU machine.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="pretrain_hsa.py's --save directory, or one iter_* directory")
    parser.add_argument("--iteration", type=int, default=None, help="this iteration instead of the latest")
    parser.add_argument("--save", required=True, help="output directory (created; existing files are replaced)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights' dtype in the output (default: as stored in the checkpoint)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="the tokenizer's number of ids: megatron pads the embedding (to a multiple of 128 x TP); "
                             "keep only the first N rows, so that no padding id can be generated (default: keep all)")
    parser.add_argument("--tokenizer-files", nargs="*", default=[],
                        help="files copied beside the model (tokenizer.json, tokenizer_config.json, ...)")
    args = parser.parse_args(argv)
    for path in args.tokenizer_files:
        if not os.path.isfile(path):
            parser.error(f"--tokenizer-files: {path} does not exist")
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        parser.error(f"{e.name} is not installed: pip install -e '.[hf]' (transformers and safetensors)")

    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU job: gloo, CPU tensors, whatever the machine has
    import torch

    from megatron_ext.compat import cpu as cpu_compat
    from megatron_ext.hf.convert import (hf_config_fields, hf_state_dict, load_megatron_checkpoint, resolve_landmark,
                                         save_hf_directory)
    from megatron_ext.testing import initialize_megatron_parallel, teardown_megatron_parallel

    cpu_compat.apply()
    cpu_compat.init_process_group(0, 1, port=cpu_compat.free_port())
    initialize_megatron_parallel()
    try:
        try:
            config, vocab, state, landmark_chunk, landmark = load_megatron_checkpoint(args.load, args.iteration)
            if args.vocab_size is not None and not 0 < args.vocab_size <= vocab:
                raise ValueError(f"--vocab-size {args.vocab_size}: the checkpoint's embedding has {vocab} rows; give "
                                 f"the tokenizer's number of ids, at most {vocab}")
            # a GCA model's landmark row stays (the model inserts the token itself, never generates it)
            fields = hf_config_fields(config, args.vocab_size or vocab,
                                      landmark_token_id=resolve_landmark(landmark_chunk, landmark, args.vocab_size),
                                      landmark_chunk_size=landmark_chunk)
        except (FileNotFoundError, ValueError) as e:
            print(f"convert_checkpoint_to_hf: {e}", file=sys.stderr)
            return 2
        dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
        weights = hf_state_dict(state, tied=fields["tie_word_embeddings"], dtype=dtype,
                                vocab_size=fields["vocab_size"])
        save_hf_directory(args.save, fields, weights, tuple(args.tokenizer_files))
    finally:
        teardown_megatron_parallel()
        torch.distributed.destroy_process_group()
    total = sum(t.numel() for t in weights.values())
    print(f"wrote {args.save}: {fields['layer_pattern']!r}, {total / 1e6:.1f}M parameters "
          f"({next(iter(weights.values())).dtype}), config.json, model.safetensors, model code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
