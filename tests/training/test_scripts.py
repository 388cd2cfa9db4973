"""The launch scripts and the image: the SLURM job's preemption flow against stub srun/scontrol/torchrun, the shell
syntax of every example script, and what the Docker build copies and keeps."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SBATCH = os.path.join(ROOT, "examples", "slurm_multinode.sbatch")
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh"))) + [SBATCH]

# srun as slurmstepd behaves: one task per node, a forwarded signal reaches every process of every task, and with
# --kill-on-bad-exit the first task to exit non-zero kills the others.
STUB_SRUN = """
import os, signal, subprocess, sys, time
args = sys.argv[1:]
kill_on_bad_exit = False
while args[0].startswith("-"):
    option = args.pop(0)
    kill_on_bad_exit |= option in ("--kill-on-bad-exit", "--kill-on-bad-exit=1", "-K", "-K1")
tasks = [subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(node)), start_new_session=True)
         for node in range(int(os.environ["SLURM_NNODES"]))]

def forward(signum, frame):
    for task in tasks:
        try:
            os.killpg(task.pid, signum)
        except ProcessLookupError:
            pass

signal.signal(signal.SIGUSR1, forward)
codes = {}
while len(codes) < len(tasks):
    for node, task in enumerate(tasks):
        if node not in codes and task.poll() is not None:
            codes[node] = task.returncode
            if task.returncode != 0 and kill_on_bad_exit:
                for other in tasks:
                    if other.poll() is None:
                        os.killpg(other.pid, signal.SIGKILL)
    time.sleep(0.02)
sys.exit(max(code if code >= 0 else 128 - code for code in codes.values()))
"""

# torchrun after SIGUSR1: waits for its workers' save (node 1 is slower) and exits 1, as it re-raises the signal.
STUB_TORCHRUN = """
import os, pathlib, signal, sys, time
stub_dir, node = pathlib.Path(os.environ["STUB_DIR"]), int(os.environ["SLURM_NODEID"])
(stub_dir / f"args-{node}").write_text("\\n".join(sys.argv[1:]))
if os.environ["STUB_MODE"] == "fail" and node == 0:
    sys.exit(3)
received = []
signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
(stub_dir / f"started-{node}").touch()
while not received:
    time.sleep(0.02)
time.sleep(0.3 + 0.7 * node)
(stub_dir / f"saved-{node}").write_text(str(len(received)))
sys.exit(1)
"""

STUB_SCONTROL = """
import os, pathlib, sys
if sys.argv[1:3] == ["show", "hostnames"]:
    print("node-a\\nnode-b")
else:
    with open(pathlib.Path(os.environ["STUB_DIR"]) / "scontrol.log", "a") as log:
        log.write(" ".join(sys.argv[1:]) + "\\n")
"""


def _stub_env(tmp_path, mode, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, source in (("srun", STUB_SRUN), ("torchrun", STUB_TORCHRUN), ("scontrol", STUB_SCONTROL)):
        stub = bin_dir / name
        stub.write_text(f"#!{sys.executable}\n{source}")
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_DIR=str(tmp_path), STUB_MODE=mode,
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8",
               DATA_PATH="/data/corpus_text_document", TOKENIZER="/data/tokenizer.json",
               CHECKPOINT_PATH=str(tmp_path / "ckpt"))
    env.pop("REQUEUE", None)
    env.update(extra)
    return env


def _start_job(env):
    return subprocess.Popen(["bash", SBATCH], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(paths, job, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert job.poll() is None, job.communicate()[0]
        assert time.monotonic() < deadline, f"{paths} never appeared"
        time.sleep(0.05)


def _preempt(tmp_path, env):
    job = _start_job(env)
    _wait_for([tmp_path / "started-0", tmp_path / "started-1"], job)
    job.send_signal(signal.SIGUSR1)  # --signal=B:USR1 signals the batch shell only
    output, _ = job.communicate(timeout=60)
    return job.returncode, output


def test_preemption_saves_on_every_node_requeues_and_exits_0(tmp_path):
    returncode, output = _preempt(tmp_path, _stub_env(tmp_path, "preempt"))
    assert returncode == 0, output
    # Node 0 finished first: it did not cut node 1's longer save short, and each torchrun got the signal once.
    assert (tmp_path / "saved-0").read_text() == "1" and (tmp_path / "saved-1").read_text() == "1", output
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    args = (tmp_path / "args-1").read_text().split("\n")
    assert args[:2] == ["--node-rank", "1"]
    assert args[args.index("--tokenizer-model") + 1] == "/data/tokenizer.json"
    assert args[args.index("--data-path") + 1] == "/data/corpus_text_document"


def test_requeue_can_be_turned_off(tmp_path):
    returncode, output = _preempt(tmp_path, _stub_env(tmp_path, "preempt", REQUEUE="0"))
    assert returncode == 0, output
    assert (tmp_path / "saved-1").exists()
    assert not (tmp_path / "scontrol.log").exists()


def test_a_real_failure_stops_every_node_and_the_job_fails(tmp_path):
    job = _start_job(_stub_env(tmp_path, "fail"))
    output, _ = job.communicate(timeout=60)
    assert job.returncode != 0, output
    assert not (tmp_path / "scontrol.log").exists()


@pytest.mark.parametrize("missing", ["DATA_PATH", "TOKENIZER", "CHECKPOINT_PATH"])
def test_refuses_to_start_without_its_inputs(tmp_path, missing):
    env = _stub_env(tmp_path, "preempt")
    del env[missing]
    job = _start_job(env)
    output, _ = job.communicate(timeout=30)
    assert job.returncode != 0
    assert f"export {missing}=" in output
    assert not (tmp_path / "args-0").exists()


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_syntax(script):
    subprocess.run(["bash", "-n", script], check=True)


def test_docker_build_context_and_pip_constraints():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = {line.strip().strip("/") for line in f if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "outputs"} <= ignored
    with open(os.path.join(ROOT, "docker", "Dockerfile")) as f:
        instructions = "".join(line for line in f if not line.lstrip().startswith("#"))
    # The base image's PIP_CONSTRAINT pins its torch and numpy builds; overriding it would let pip replace them.
    assert "PIP_CONSTRAINT" not in instructions
    assert "--upgrade" not in instructions and " -U " not in instructions
