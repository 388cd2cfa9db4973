"""Tokenize JSONL text into megatron-core indexed datasets ({prefix}_{key}_document.bin/.idx).

Flags keep Megatron-LM's names. Example (the bundled corpus and byte-level tokenizer, no files needed):

    python tools/preprocess_data.py --input megatron_ext/data/corpus/tiny_corpus.jsonl \\
        --output-prefix /tmp/tiny --tokenizer-type ByteLevelTokenizer --append-eod --workers 2

Bad input (malformed JSON, a missing key, a non-string value, invalid UTF-8, empty documents, over-long lines) is
counted, reported with file:line samples and skipped (``--on-error skip``), or stops the run with the first
offender (``--on-error fail``). See docs/data.md.
"""

import argparse
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.data.documents import InputError  # noqa: E402
from megatron_ext.data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from megatron_ext.data.tokenizers import TOKENIZER_TYPES, TokenizerSpec  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="JSONL files, directories or glob patterns; .gz/.bz2/.xz, and .zst when `zstandard` "
                            "is installed")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract; each key gets its own dataset (default: text)")
    group.add_argument("--split-sentences", action="store_true", help="not supported: documents are kept whole")

    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True,
                       choices=[t for t in TOKENIZER_TYPES if t != "NullTokenizer"]
                       + ["GPTSentencePieceTokenizer", "Llama2Tokenizer"])
    group.add_argument("--tokenizer-model", default=None, help="SentencePiece .model, or HF tokenizer.json/dir")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer merges.txt")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")

    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="path prefix; writes {prefix}_{key}_document.{bin,idx} and {prefix}_preprocess_report.json")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any)")
    group.add_argument("--partitions", type=int, default=1,
                       help="split the input files into this many groups, each finalized on its own (a rerun "
                            "reuses finished ones), then merged")
    group.add_argument("--keep-partitions", action="store_true",
                       help="keep the partitions as separate datasets instead of merging them, and write "
                            "{prefix}_{key}_document.data_path.txt, a token-weighted --data-path blend of them "
                            "(for inputs with hundreds of millions of documents: the merge holds the whole index "
                            "in memory)")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    group.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                       help="skip: count, report and leave out bad documents (default); fail: stop at the first")
    group.add_argument("--max-line-bytes", type=int, default=64 << 20,
                       help="lines longer than this are skipped as bad input (default 64 MiB)")
    group.add_argument("--error-samples", type=int, default=5, help="file:line samples reported per kind")
    args = parser.parse_args(argv)
    if args.split_sentences:
        parser.error("--split-sentences is not supported: documents are kept whole (long-context training)")
    return args


def _interrupt_on_sigterm():
    """Turn SIGTERM (a job scheduler's stop) into KeyboardInterrupt, so temporary files are cleaned up.
    Returns the previous handler."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, handler)
    return None


def main(argv=None) -> int:
    args = get_args(argv)
    previous = _interrupt_on_sigterm()
    options = PreprocessOptions(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file),
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        partitions=args.partitions,
        log_interval=args.log_interval,
        on_error=args.on_error,
        max_line_bytes=args.max_line_bytes,
        error_samples=args.error_samples,
        keep_partitions=args.keep_partitions,
    )
    try:
        preprocess(options)
    except (InputError, FileNotFoundError, ImportError, ValueError) as err:
        print(f"[preprocess_data] error: {err}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
