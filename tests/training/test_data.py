"""Data flags against the model (``megatron_ext.training.data.check_data_against_model``), at startup."""

import argparse
import math

import pytest

from megatron_ext.data.corpus import TOKENIZER_MODEL
from megatron_ext.data.tokenizers import build_tokenizer
from megatron_ext.training.data import check_data_against_model
from tests.training.runner import run

TINY_GCA = [
    "--num-layers", "3", "--layer-pattern", "swa [gca swa]", "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "96", "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
    "--seq-length", "64", "--max-position-embeddings", "64", "--position-embedding-type", "rope",
    "--swa-window-size", "16", "--hsa-chunk-size", "16", "--hsa-topk", "2", "--hsa-encoder-layers", "1",
    "--hsa-kernel-backend", "reference", "--micro-batch-size", "2", "--global-batch-size", "2",
    "--lr", "1e-3", "--train-iters", "2", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", TOKENIZER_MODEL,
]


def _args(**kw):
    base = dict(num_layers=3, layer_pattern="swa [gca swa]", hsa_chunk_size=16, seq_length=64, mock_data=True,
                data_landmark_chunk_size=16, data_landmark_token_id=None, data_pack_chunk_size=None,
                padded_vocab_size=512, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, rank=0)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("tp", [1, 2])
def test_landmark_token_gets_a_row_of_the_padded_vocabulary(tp):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=TOKENIZER_MODEL)
    assert tokenizer.vocab_size == 512  # already a multiple of 128: megatron adds no padding row
    args = _args(tensor_model_parallel_size=tp)
    check_data_against_model(args, tokenizer)
    multiple = 128 * tp
    assert args.padded_vocab_size == math.ceil((512 + 1) / multiple) * multiple  # landmark id 512 fits
    check_data_against_model(args, tokenizer)  # a second model chunk: unchanged
    assert args.padded_vocab_size == math.ceil((512 + 1) / multiple) * multiple

    args = _args(data_landmark_token_id=3)  # an id inside the vocabulary needs no padding
    check_data_against_model(args, tokenizer)
    assert args.padded_vocab_size == 512


def test_pack_chunk_must_be_a_multiple_of_the_model_chunk():
    with pytest.raises(ValueError, match="--data-pack-chunk-size 16.*--hsa-chunk-size 32"):
        check_data_against_model(_args(layer_pattern="swa [hsa swa]", hsa_chunk_size=32, data_pack_chunk_size=16,
                                       data_landmark_chunk_size=None), None)
    check_data_against_model(_args(layer_pattern="swa [hsa swa]", hsa_chunk_size=16, data_pack_chunk_size=32,
                                   data_landmark_chunk_size=None), None)
    # no retrieval layer: packing has no model chunk to align with
    check_data_against_model(_args(layer_pattern="swa*3", hsa_chunk_size=32, data_pack_chunk_size=16,
                                   data_landmark_chunk_size=None), None)


def test_gca_model_without_landmarks_is_warned_and_a_wrong_landmark_chunk_refused():
    with pytest.warns(UserWarning, match="--data-landmark-chunk-size 16"):
        check_data_against_model(_args(data_landmark_chunk_size=None), None)
    with pytest.raises(ValueError, match="--data-landmark-chunk-size 32 differs.*--hsa-chunk-size 16"):
        check_data_against_model(_args(data_landmark_chunk_size=32, seq_length=64), None)


def test_gca_training_with_landmarks_on_a_vocabulary_without_padding(tmp_path):
    """The demo's 512-piece tokenizer and the default landmark id 512: trains (was an embedding IndexError)."""
    from megatron_ext.data.corpus import build_demo_data

    prefix, _ = build_demo_data(str(tmp_path / "data"))
    result = run(TINY_GCA + ["--data-path", prefix, "--split", "98,2,0", "--data-landmark-chunk-size", "16"]).check()
    assert sorted(result.losses()) == [1, 2]
    assert "to cover the GCA landmark token id 512" in result.output


def test_pack_chunk_smaller_than_the_model_chunk_fails_at_startup_naming_both_flags():
    result = run(TINY_GCA + ["--mock-data", "--data-landmark-chunk-size", "32", "--data-pack-chunk-size", "32",
                             "--hsa-chunk-size", "64"])
    assert result.returncode != 0
    assert "--data-pack-chunk-size 32 is not a multiple of the model's --hsa-chunk-size 64" in result.output
    assert result.losses() == {}


def test_split_without_validation_documents_skips_validation(tmp_path):
    """``--split 100,0,0``: megatron-core 0.19.2 wraps the missing validation loader in a list, so it validated
    anyway, on no batch (``embedding(): argument 'indices' ... must be Tensor, not NoneType``)."""
    from megatron_ext.data.corpus import build_demo_data

    prefix, _ = build_demo_data(str(tmp_path / "data"))
    args = [a for a in TINY_GCA if a not in ("--eval-interval", "1000")]
    result = run(args + ["--data-path", prefix, "--split", "100,0,0", "--eval-interval", "1"]).check()
    assert sorted(result.losses()) == [1, 2]
    assert "validation loss" not in result.output
