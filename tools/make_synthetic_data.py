"""Generate synthetic long-context retrieval tasks as megatron-core indexed datasets.

    python tools/make_synthetic_data.py --task passkey --seq-length 32768 --num-samples 64 \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model megatron_ext/data/corpus/tiny_sp.model \\
        --output-prefix /tmp/passkey_32k

Writes {prefix}.bin/.idx (one document of exactly --seq-length tokens per sample: haystack + question + answer
+ EOD) and {prefix}.answers.jsonl (answer text, answer_start token offset, needle depths). Tasks: passkey,
multikey, multivalue, variable_tracking. See megatron_ext/data/synthetic.py and docs/data.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.data.synthetic import TASKS, write_task_dataset  # noqa: E402
from megatron_ext.data.tokenizers import TOKENIZER_TYPES, TokenizerSpec  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--seq-length", type=int, required=True, help="tokens per sample (exact)")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--num-needles", type=int, default=4, help="multikey/multivalue needles; tracked chains")
    parser.add_argument("--hops", type=int, default=4, help="variable_tracking: assignments per chain")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-eod", action="store_true", help="do not end each sample with the EOD token")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-type", required=True, choices=[t for t in TOKENIZER_TYPES if t != "NullTokenizer"])
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None)
    args = parser.parse_args(argv)
    tokenizer = TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file).build()
    try:
        prefix = write_task_dataset(args.output_prefix, args.task, tokenizer, args.seq_length, args.num_samples,
                                    seed=args.seed, num_needles=args.num_needles, hops=args.hops,
                                    append_eod=not args.no_eod)
    except ValueError as err:
        print(f"[make_synthetic_data] error: {err}", file=sys.stderr)
        return 2
    print(f"[make_synthetic_data] wrote {args.num_samples} {args.task} samples of {args.seq_length} tokens to "
          f"{prefix}.bin/.idx and {prefix}.answers.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
