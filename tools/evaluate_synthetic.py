"""Score a Hugging Face model directory on synthetic long-context tasks (greedy exact match, per length and depth).

    python tools/make_synthetic_data.py --task passkey --seq-length 65536 --num-samples 50 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json --output-prefix data/passkey_64k
    python tools/convert_checkpoint_to_hf.py --load checkpoints/swa_hsa_345m --save hf/swa_hsa_345m --dtype bf16
    python tools/evaluate_synthetic.py --model hf/swa_hsa_345m --data data/passkey_8k data/passkey_64k \\
        --output results/passkey.jsonl

One forward pass per sample (the answer's logits only): ``exact`` = greedy decoding after the prompt gives the whole
answer, ``token acc`` = share of answer tokens that are the argmax, ``NLL`` = mean negative log-likelihood of the
answer tokens. The table has one row per task and length, then one per needle-depth fifth for one-needle tasks
(passkey); --output gets one JSON object per sample. See megatron_ext/hf/evaluate.py and docs/data.md.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Hugging Face model directory (tools/convert_checkpoint_to_hf.py)")
    parser.add_argument("--data", nargs="+", required=True, help="task dataset prefixes (tools/make_synthetic_data.py)")
    parser.add_argument("--max-samples", type=int, default=None, help="at most this many samples per dataset")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is a GPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="run the model in this dtype (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--output", default=None, help="write one JSON object per sample to this file")
    parser.add_argument("--quiet", action="store_true", help="no line per sample")
    args = parser.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples {args.max_samples}: give at least 1")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"--model {args.model}: no config.json there; give a Hugging Face model directory "
                     f"(tools/convert_checkpoint_to_hf.py writes one)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("transformers is not installed: pip install -e '.[hf]'")
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_ext.hf.evaluate import score_task_dataset, summarize

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")])
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=dtype).to(device).eval()
    vocab = getattr(model.config, "vocab_size", None)
    records = []
    try:
        for prefix in args.data:
            records += score_task_dataset(model, prefix, device, vocab_size=vocab, max_samples=args.max_samples,
                                          log=(lambda msg: None) if args.quiet else print)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate_synthetic: {e}", file=sys.stderr)
        return 2
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    print(f"{'task':<18} {'length':>8} {'depth':>9} {'samples':>7} {'exact':>7} {'token acc':>9} {'NLL':>7}")
    for row in summarize(records):
        depth = "all" if row["depth_bin"] is None else f"{row['depth_bin'] * 20}-{row['depth_bin'] * 20 + 20}%"
        print(f"{row['task']:<18} {row['length']:>8} {depth:>9} {row['samples']:>7} {row['exact']:>7.1%} "
              f"{row['token_accuracy']:>9.1%} {row['answer_nll']:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
