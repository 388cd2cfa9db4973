"""tools/convert_checkpoint_to_hf.py end to end: a checkpoint saved by pretrain_hsa.py becomes a Hugging Face
directory that AutoModelForCausalLM loads (trust_remote_code) and whose logits are the checkpointed model's."""

import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tests.training import runner  # noqa: E402

TOOL = os.path.join(runner.REPO, "tools", "convert_checkpoint_to_hf.py")


def _convert(*args):
    return subprocess.run([sys.executable, TOOL, *args], cwd=runner.REPO, env=runner.env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny SWA+HSA model trained 3 iterations, saved (torch_dist) at iteration 3; untied output layer so both
    embedding and output weights must come through."""
    save = tmp_path_factory.mktemp("ckpt")
    runner.run([*runner.TINY_SWA_HSA, "--train-iters", "3", "--save", str(save), "--save-interval", "3",
                "--untie-embeddings-and-output-weights", "--hsa-rank-decay"]).check()
    return save


def test_converted_model_gives_the_checkpoint_logits(checkpoint, tmp_path, megatron_world):
    from transformers import AutoModelForCausalLM

    from megatron_ext.hf.convert import load_megatron_checkpoint
    from megatron_ext.models import build_model

    out = tmp_path / "hf"
    proc = _convert("--load", str(checkpoint), "--save", str(out), "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout
    assert {"config.json", "model.safetensors", "modeling_hsa_gpt.py", "configuration_hsa_gpt.py"} <= set(
        os.listdir(out))
    fields = json.load(open(out / "config.json"))
    assert fields["layer_pattern"] == "swa [hsa swa]" and fields["tie_word_embeddings"] is False

    config, vocab, state, *_ = load_megatron_checkpoint(str(checkpoint))
    model = build_model(config, vocab_size=vocab).eval()
    model.load_state_dict(state)
    assert model.decoder.layers[1].retrieval.rank_decay.item() != 0.0  # trained: not the initial value
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(hf).__name__ == "HSAGPTForCausalLM"
    tokens = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens, torch.arange(64).expand(2, 64), None)
        got = hf(tokens).logits
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_vocab_size_drops_the_padding_rows(checkpoint, tmp_path, megatron_world):
    from transformers import AutoModelForCausalLM

    from megatron_ext.hf.convert import load_megatron_checkpoint
    from megatron_ext.models import build_model

    out = tmp_path / "hf"
    proc = _convert("--load", str(checkpoint), "--save", str(out), "--vocab-size", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(out / "config.json"))["vocab_size"] == 100
    config, vocab, state, *_ = load_megatron_checkpoint(str(checkpoint))
    model = build_model(config, vocab_size=vocab).eval()
    model.load_state_dict(state)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    tokens = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens, torch.arange(64)[None], None)[..., :100]
        got = hf(tokens).logits
    assert got.shape[-1] == 100
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_bad_inputs_get_one_line_errors(checkpoint, tmp_path):
    proc = _convert("--load", str(tmp_path / "nope"), "--save", str(tmp_path / "out"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = _convert("--load", str(checkpoint), "--save", str(tmp_path / "out"), "--vocab-size", "999")
    assert proc.returncode == 2 and "--vocab-size 999: the checkpoint's embedding has 128 rows" in proc.stderr
    proc = _convert("--load", str(checkpoint), "--iteration", "7", "--save", str(tmp_path / "out"))
    assert proc.returncode == 2 and "no checkpoint of iteration 7" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_tensors_of_the_model_is_named(checkpoint, megatron_world, monkeypatch):
    # a torch_dist checkpoint that lacks tensors the model has (here: landmark norms it was not trained with)
    import megatron_ext.training.model as training_model
    from megatron_ext.hf.convert import load_megatron_checkpoint

    build = training_model.transformer_config_from_args

    def with_landmark_norm(args):
        args.hsa_landmark_norm = True
        return build(args)

    monkeypatch.setattr(training_model, "transformer_config_from_args", with_landmark_norm)
    with pytest.raises(ValueError, match=r"lacks 2 of the model's tensors, e\.g\. .*retrieval\.landmark_norm\.weight"):
        load_megatron_checkpoint(str(checkpoint))


def test_torch_checkpoint_without_arguments_or_model_gets_a_one_line_error(tmp_path):
    # a --ckpt-format torch file that pretrain_hsa.py did not write: no saved arguments, or no model
    for name, content in (("no_args", {"model": {}, "iteration": 1}),
                          ("no_model", {"args": Namespace(), "iteration": 1})):
        rank = tmp_path / name / "iter_0000001" / "mp_rank_00"
        rank.mkdir(parents=True)
        torch.save(content, rank / "model_optim_rng.pt")
        proc = _convert("--load", str(tmp_path / name / "iter_0000001"), "--save", str(tmp_path / "out"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert ("stores no training arguments" if name == "no_args" else "stores no model") in proc.stderr
    assert not (tmp_path / "out").exists()


def test_release_checkpoint_directory_resolves(tmp_path):
    # megatron's tracker says 'release' for a checkpoint in <save>/release (Megatron-LM's converters write those)
    from megatron_ext.hf.convert import resolve_checkpoint_dir

    (tmp_path / "release").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path / "release")
    assert resolve_checkpoint_dir(str(tmp_path / "release")) == str(tmp_path / "release")


def test_torch_checkpoint_of_several_ranks_is_named_as_such(tmp_path):
    # --ckpt-format torch under PP 2 writes mp_rank_00_000 and mp_rank_00_001 (TP rank, PP rank): no mp_rank_00
    from megatron_ext.hf.convert import load_megatron_checkpoint

    for rank in ("mp_rank_00_000", "mp_rank_00_001"):
        (tmp_path / "iter_0000001" / rank).mkdir(parents=True)
        (tmp_path / "iter_0000001" / rank / "model_optim_rng.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="torch checkpoint of several model-parallel ranks"):
        load_megatron_checkpoint(str(tmp_path / "iter_0000001"))


def _layer_args(extra):
    """TINY_SWA_HSA on four layers (pipeline stages of two) at learning rate 0: a run saves the weights it started
    from."""
    args = list(runner.TINY_SWA_HSA)
    args[args.index("--num-layers") + 1] = "4"
    args[args.index("--layer-pattern") + 1] = "swa [hsa swa] swa"
    args[args.index("--lr") + 1] = "0"
    args[args.index("--min-lr") + 1] = "0"
    return [*args, "--hsa-rank-decay", *extra]


def test_any_parallel_layout_converts_to_the_same_model(tmp_path):
    # The weights of a one-rank checkpoint, loaded (resharded) by runs under TP 2 and PP 2 that save them unchanged
    # in their own layouts: each conversion must give back exactly the one-rank model.
    from safetensors.torch import load_file

    first = tmp_path / "tp1"
    runner.run(_layer_args(["--train-iters", "3", "--save-interval", "3", "--save", str(first)])).check()
    converted = {}
    # PP 2 with uneven stages (1 + 3 layers): the one-rank model must not keep megatron's per-stage layer counts
    for name, layout in (("tp1", None), ("tp2", ["--tensor-model-parallel-size", "2"]),
                         ("pp2", ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"])):
        save = first
        if layout is not None:
            save = tmp_path / name
            runner.run(_layer_args([*layout, "--load", str(first), "--no-load-optim", "--no-load-rng",
                                    "--train-iters", "5", "--save-interval", "5", "--save", str(save)]),
                       nproc=2).check()
        proc = _convert("--load", str(save), "--save", str(tmp_path / f"hf_{name}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        converted[name] = load_file(str(tmp_path / f"hf_{name}" / "model.safetensors"))
    reference = converted.pop("tp1")
    for name, state in converted.items():
        assert state.keys() == reference.keys(), name
        # megatron pads the vocabulary to a multiple of 128 x TP: TP 2 has 256 embedding rows for 128 tokens
        rows = {key: tensor.shape[0] for key, tensor in reference.items() if key.startswith("embedding.")}
        bad = [key for key, tensor in reference.items() if not torch.equal(state[key][: rows.get(key)], tensor)]
        assert not bad, (name, bad)


def test_moe_checkpoint_of_two_expert_parallel_ranks_converts(tmp_path, megatron_world):
    # The MoE model trained with its experts split over two ranks (EP 2): the converter reshards them into one model
    # whose Hugging Face twin gives the checkpointed model's logits.
    from transformers import AutoModelForCausalLM

    from megatron_ext.hf.convert import load_megatron_checkpoint
    from megatron_ext.models import build_model

    save, out = tmp_path / "ckpt", tmp_path / "hf"
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
           "--moe-shared-expert-intermediate-size", "48", "--moe-token-dispatcher-type", "alltoall",
           "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
           "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-2",
           "--expert-model-parallel-size", "2"]
    runner.run([*runner.TINY_SWA_HSA, *moe, "--train-iters", "3", "--save", str(save), "--save-interval", "3"],
               nproc=2).check()
    proc = _convert("--load", str(save), "--save", str(out), "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = json.load(open(out / "config.json"))
    assert fields["num_moe_experts"] == 4 and fields["moe_layers"] == [0, 1, 2]

    config, vocab, state, *_ = load_megatron_checkpoint(str(save))
    model = build_model(config, vocab_size=vocab).eval()
    model.load_state_dict(state)
    assert model.decoder.layers[0].mlp.router.expert_bias.abs().sum() > 0  # trained: the bias moved
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    tokens = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens, torch.arange(64).expand(2, 64), None)
        got = hf(tokens).logits
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_converted_gca_model_inserts_the_landmarks_of_its_training_data(tmp_path, megatron_world):
    # DRT as the paper trains it (ALiBi, a landmark token closing every chunk of the data): the converted model takes
    # text and gives the checkpointed model's logits at the text positions of the training layout
    from transformers import AutoModelForCausalLM

    from megatron_ext.data.landmarks import insert_landmarks
    from megatron_ext.hf.convert import load_megatron_checkpoint
    from megatron_ext.models import build_model

    save, out = tmp_path / "ckpt", tmp_path / "hf"
    args = list(runner.TINY_SWA_HSA)
    args[args.index("swa [hsa swa]")] = "swa [gca swa]"
    args[args.index("rope")] = "none"
    runner.run([*args, "--swa-alibi", "--data-landmark-chunk-size", "8", "--train-iters", "3", "--save", str(save),
                "--save-interval", "3"]).check()
    proc = _convert("--load", str(save), "--save", str(out), "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config, vocab, state, landmark_chunk, landmark = load_megatron_checkpoint(str(save))
    assert landmark_chunk == 8
    fields = json.load(open(out / "config.json"))
    assert fields["landmark_token_id"] == landmark == 128  # the default id: the tokenizer's vocabulary size
    assert fields["swa_alibi"] is True and fields["layer_pattern"] == "swa [gca swa]"

    model = build_model(config, vocab_size=vocab).eval()
    model.load_state_dict(state)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    text = torch.randint(0, 128, (2, 8 * 7), generator=torch.Generator().manual_seed(0))
    ids = torch.stack([insert_landmarks({"tokens": t, "labels": t, "loss_mask": torch.ones(len(t))}, 8, landmark,
                                        eod=0)["tokens"] for t in text])
    with torch.no_grad():
        expected = model(ids, torch.arange(64).expand(2, 64), None)[:, ids[0] != landmark]
        got = hf(text).logits
    columns = torch.arange(vocab) != landmark
    torch.testing.assert_close(got[..., columns], expected[..., columns], rtol=2e-5, atol=2e-5)
    # a checkpoint that does not store the default id (older ones) needs the tokenizer's size to know it
    from megatron_ext.hf.convert import resolve_landmark

    assert resolve_landmark(8, None, 129) == 129
    with pytest.raises(ValueError, match="give --vocab-size"):
        resolve_landmark(8, None, None)
