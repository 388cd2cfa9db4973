"""`make demo`: the whole training path on whatever machine this is (a CPU is fine), in about a minute.

1. preprocess the bundled tiny corpus (JSONL -> megatron indexed dataset, SentencePiece tokenizer);
2. train a tiny SWA+HSA model with ``pretrain_hsa.py`` (megatron's training loop, distributed optimizer,
   chunk-aligned document packing) and stop half-way, saving a checkpoint (``--exit-interval``);
3. resume from that checkpoint and train to the end, with validation;
4. convert the last checkpoint to a Hugging Face model (``tools/convert_checkpoint_to_hf.py``) and let it continue
   a prompt (greedy; skipped with a note where ``transformers`` is not installed);

and at the end print where everything went and the loss curve.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SWA_HSA = [
    # model: 2 SWA layers, then one retrieval group (HSA + SWA); one chunk encoder layer
    "--num-layers", "4", "--layer-pattern", "swa*2 [hsa swa]", "--hidden-size", "64",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "192",
    "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--qk-layernorm",
    "--position-embedding-type", "rope", "--swa-window-size", "32",
    "--hsa-chunk-size", "16", "--hsa-topk", "2", "--hsa-num-kv-heads", "1", "--hsa-kernel-backend", "reference",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
    # data: 256-token samples of documents packed on chunk boundaries
    "--seq-length", "256", "--max-position-embeddings", "256", "--data-pack-chunk-size", "16", "--split", "95,5,0",
    # optimisation: warm-up then cosine to a minimum LR, global batch 8 = 2 micro-batches of 4 (accumulation)
    "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
    "--lr-decay-style", "cosine", "--lr-warmup-iters", "4", "--weight-decay", "0.01", "--clip-grad", "1.0",
    "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--use-distributed-optimizer", "--seed", "1234",
    "--log-interval", "1", "--eval-interval", "20", "--eval-iters", "2",
]

_LOSS = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?lm loss: ([0-9.E+-]+)")
_VALID = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)")


def _run(cmd: list[str], log_path: str) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # each step is a world of one process: a launcher's variables (a SLURM job, torchrun) would make it join theirs
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    text = open(log_path).read()
    if proc.returncode != 0:
        sys.stderr.write(text[-4000:])
        raise SystemExit(f"demo step failed (exit code {proc.returncode}); full log: {log_path}")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--train-iters", type=int, default=40)
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    started = time.time()

    import warnings

    warnings.filterwarnings("ignore")  # megatron-core's "no TE/apex, falling back" notices, printed on import
    from megatron_ext.data.corpus import CORPUS_FILE, TOKENIZER_MODEL, build_demo_data

    print(f"[1/4] preprocessing {os.path.relpath(CORPUS_FILE, REPO)} ...", flush=True)
    prefix, _ = build_demo_data(os.path.join(out, "data"))

    ckpt, tb, logs = os.path.join(out, "checkpoints"), os.path.join(out, "tensorboard"), os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    half = args.train_iters // 2
    base = [sys.executable, os.path.join(REPO, "pretrain_hsa.py"), *TINY_SWA_HSA,
            "--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", TOKENIZER_MODEL,
            "--train-iters", str(args.train_iters), "--save-interval", str(half), "--save", ckpt,
            "--tensorboard-dir", tb, "--keep-last-checkpoints", "2"]
    print(f"[2/4] training a tiny SWA+HSA model, iterations 1-{half}, then saving and stopping ...", flush=True)
    first = _run(base + ["--exit-interval", str(half)], os.path.join(logs, "train_part1.log"))
    print(f"[3/4] resuming from the iteration-{half} checkpoint, iterations {half + 1}-{args.train_iters} ...",
          flush=True)
    second = _run(base + ["--load", ckpt], os.path.join(logs, "train_part2.log"))
    if f"at iteration {half}" not in second:
        raise SystemExit("the second run did not resume from the checkpoint; see " + logs)

    hf_dir, continuation = os.path.join(out, "hf"), None
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("[4/4] skipped: converting to Hugging Face needs transformers (pip install -e '.[hf]')", flush=True)
    else:
        print(f"[4/4] converting the last checkpoint to a Hugging Face model, then continuing a prompt ...",
              flush=True)
        import sentencepiece

        pieces = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER_MODEL).get_piece_size()
        _run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint_to_hf.py"), "--load", ckpt, "--save",
              hf_dir, "--vocab-size", str(pieces), "--tokenizer-files", TOKENIZER_MODEL],
             os.path.join(logs, "convert_to_hf.log"))
        continuation = _continue_prompt(hf_dir, TOKENIZER_MODEL, PROMPT)

    print("\niteration | lm loss")
    for text in (first, second):
        for it, _, loss in _LOSS.findall(text):
            print(f"{int(it):9d} | {float(loss):.4f}")
    for text in (first, second):
        for it, loss in dict(_VALID.findall(text)).items():
            print(f"validation lm loss at iteration {it}: {float(loss):.4f}")
    print(f"\nDone in {time.time() - started:.0f} s. Outputs:")
    print(f"  tokenized corpus   {prefix}.bin/.idx")
    print(f"  checkpoints        {ckpt}  (latest: iteration "
          f"{open(os.path.join(ckpt, 'latest_checkpointed_iteration.txt')).read().strip()})")
    print(f"  TensorBoard        {tb}   (tensorboard --logdir {tb})")
    print(f"  training logs      {logs}")
    if continuation is not None:
        print(f"  Hugging Face model {hf_dir}  (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))")
        print(f"\nthe Hugging Face model continues {PROMPT!r}: {continuation!r}")


PROMPT = '"Where were you?" asked'


def _continue_prompt(hf_dir: str, tokenizer_model: str, prompt: str, new_tokens: int = 16) -> str:
    """Greedy continuation of ``prompt`` by the converted model, loaded as any Hugging Face model is."""
    import sentencepiece
    import torch
    from transformers import AutoModelForCausalLM

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    ids = torch.tensor([sp.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return sp.decode(out[0, ids.shape[1]:].tolist())


if __name__ == "__main__":
    main()
