"""Suite-wide setup.

On a machine without a CUDA GPU, Triton kernels run in the Triton interpreter: the variable must be set before
anything imports triton (megatron-core imports it too), so it is set here, at collection time.
Tests that need a GPU carry ``@pytest.mark.gpu`` and are skipped with a reason on CPU.
"""

import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the imports themselves
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def _megatron_process_group():
    """A single-process distributed world (gloo on CPU, NCCL on a GPU) shared by the in-process megatron tests."""
    import torch

    from megatron_ext.compat import cpu as cpu_compat

    cpu_compat.apply()
    cpu_compat.init_process_group(0, 1)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def megatron_world(_megatron_process_group):
    """megatron-core's parallel state at world size 1 (TP=PP=EP=1), fresh for each test and seeded with 1234."""
    from megatron_ext.testing import initialize_megatron_parallel, teardown_megatron_parallel

    initialize_megatron_parallel(seed=1234)
    yield
    teardown_megatron_parallel()


@pytest.fixture(autouse=True)
def _reset_megatron_class_state():
    """megatron-core keeps MoE state per process: the aux-loss gradient scale on a class (the first caller fixes its
    shape and the next test's schedule then fails copying a differently-shaped scale into it) and a metrics tracker
    sized by the first MoE model's depth (a deeper model built later in the same process indexes past its end).
    Each test starts without either."""
    yield
    import sys

    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
    moe_logging = sys.modules.get("megatron.core.transformer.moe.moe_logging")
    if moe_logging is not None:
        moe_logging.destroy_moe_metrics_tracker()


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained locally with the `tokenizers` library (skips without it)."""
    import json

    from megatron_ext.data.corpus import CORPUS_FILE

    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    with open(CORPUS_FILE) as f:
        texts = [json.loads(line)["text"] for line in f][:100]
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    hf.save(str(path))
    return str(path)
