"""``pretrain_hsa.py`` reads data written by ``tools/preprocess_data.py`` with the tokenizer flags given to both."""

import json
import shutil

from megatron_ext.data.corpus import CORPUS_FILE
from megatron_ext.data.preprocess import PreprocessOptions, dataset_prefix, preprocess
from megatron_ext.data.tokenizers import TokenizerSpec
from tests.training.runner import TINY_SWA_HSA, run

# The runner's tiny model and optimiser, on a real dataset: no mock data, no NullTokenizer.
TINY = [a for a in TINY_SWA_HSA if a not in ("--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
                                              "128")]
TRAIN = ["--train-iters", "3", "--split", "90,10,0", "--data-pack-chunk-size", "8"]


def _preprocess(tmp_path, spec: TokenizerSpec) -> str:
    output_prefix = str(tmp_path / "data" / "corpus")
    preprocess(PreprocessOptions(inputs=[CORPUS_FILE], output_prefix=output_prefix, tokenizer=spec, append_eod=True,
                                 workers=1, log_interval=0), log=lambda msg: None)
    return dataset_prefix(output_prefix, "text")


def test_hugging_face_tokenizer_json_file_trains(tmp_path, hf_tokenizer_json):
    """examples/train_swa_hsa_345m.sh and slurm_multinode.sbatch pass TOKENIZER=tokenizer.json to
    ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model``, as preprocessing takes it; megatron's wrapper only
    takes a transformers directory ("Repo id must be in the form ...")."""
    prefix = _preprocess(tmp_path, TokenizerSpec("HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_json))

    result = run(TINY + TRAIN + ["--data-path", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                                 "--tokenizer-model", hf_tokenizer_json]).check()
    assert sorted(result.losses()) == [1, 2, 3]


def test_tokenizer_json_file_refuses_flags_it_would_ignore(hf_tokenizer_json):
    from argparse import Namespace

    import pytest

    from megatron_ext.training.data import build_tokenizer

    args = Namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_json,
                     special_tokens=["<tool>"], metadata_path=None)
    with pytest.raises(SystemExit, match="tokenizer.json file, which takes no --tokenizer-special-tokens"):
        build_tokenizer(args)


def test_hugging_face_tokenizer_directory_without_eos_token_is_a_one_line_error(tmp_path, hf_tokenizer_json):
    # megatron's wrapper has no end-of-document id then (mock data failed with "MockGPTDataset failed to build");
    # the error names the token preprocessing takes and where to declare it, and declaring it is enough
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    shutil.copy(hf_tokenizer_json, directory / "tokenizer.json")
    args = TINY + TRAIN + ["--mock-data", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                           str(directory)]
    failed = run(args)
    assert failed.returncode != 0
    assert "the Hugging Face tokenizer has no eos_token" in failed.output
    assert "'<|endoftext|>'" in failed.output and "tokenizer_config.json" in failed.output
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert sorted(run(args).check().losses()) == [1, 2, 3]
