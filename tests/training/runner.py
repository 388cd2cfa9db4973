"""Run ``pretrain_hsa.py`` in a subprocess (one CPU process over gloo, or a torchrun world) and read its log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "pretrain_hsa.py")

# A tiny SWA+HSA model, fp32, dropout on (so that resume must restore the RNG too), distributed optimizer.
TINY_SWA_HSA = [
    "--num-layers", "3", "--layer-pattern", "swa [hsa swa]", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "96", "--swiglu",
    "--normalization", "RMSNorm", "--disable-bias-linear", "--qk-layernorm",
    "--seq-length", "64", "--max-position-embeddings", "64", "--position-embedding-type", "rope",
    "--swa-window-size", "16", "--hsa-chunk-size", "8", "--hsa-topk", "2", "--hsa-num-kv-heads", "1",
    "--hsa-kernel-backend", "reference",
    "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--use-distributed-optimizer", "--seed", "1234",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
]

_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")  # torch.distributed's excepthook prefixes every line
_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+) \|.*?grad norm: ([0-9.]+) \|")


@dataclass
class Run:
    returncode: int
    output: str

    def losses(self) -> dict[int, str]:
        """iteration -> the logged ``lm loss`` text (6 significant decimals, as megatron prints it)."""
        return {int(m.group(1)): m.group(2) for m in _ITERATION.finditer(self.output)}

    def grad_norms(self) -> dict[int, str]:
        return {int(m.group(1)): m.group(3) for m in _ITERATION.finditer(self.output)}

    def tracebacks(self) -> list[str]:
        """The tracebacks in the output, but for one that is not the run's: a data-loader worker's fd-sharing thread
        (multiprocessing's ``resource_sharer``) reporting a connection the main process dropped. Seen once in CI
        after a Ctrl-C whose run saved and exited 0; it says nothing about the run."""
        blocks, current = [], None
        for line in (_RANK_PREFIX.sub("", raw) for raw in self.output.splitlines()):
            if line.startswith("Traceback (most recent call last)"):
                current = [line]
                blocks.append(current)
            elif current is not None:
                current.append(line)
                if line and not line[0].isspace():  # the exception's own line ends the traceback
                    current = None
        return ["\n".join(b) for b in blocks
                if not ("multiprocessing/resource_sharer.py" in "\n".join(b)
                        and b[-1].startswith(("ConnectionResetError", "BrokenPipeError")))]

    def check(self) -> "Run":
        assert self.returncode == 0, f"pretrain_hsa.py failed (rc {self.returncode}):\n{self.output[-6000:]}"
        return self


def env(threads: int = 1) -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = str(threads)
    e["PYTHONUNBUFFERED"] = "1"
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def start(args: list[str], *, nproc: int = 1, threads: int = 1, log_path: str | None = None,
          new_session: bool = False) -> subprocess.Popen:
    """Start the script; its output goes to a file (a pipe could fill up and stall it): ``log_path`` if given (to
    watch it while the run goes on), else a temporary file. ``new_session``: its own process group, which
    ``os.killpg`` signals as a terminal's Ctrl-C does (the script and its data-loader workers)."""
    if nproc == 1:
        cmd = [sys.executable, SCRIPT, *args]
    else:
        from megatron_ext.compat.cpu import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), SCRIPT, *args]
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(threads), stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> Run:
    proc.wait(timeout=timeout)
    proc.log.seek(0)
    out = proc.log.read()
    proc.log.close()
    return Run(proc.returncode, out)


def run(args: list[str], **kwargs) -> Run:
    """Run the script to its end. A rendezvous port taken by another process before the bind (test modules run
    side by side) fails at startup, before anything is read or written: that run starts again on a new port."""
    from megatron_ext.compat.cpu import is_port_clash

    for attempt in range(3):
        result = finish(start(args, **kwargs))
        if result.returncode == 0 or not is_port_clash(result.output) or attempt == 2:
            return result
