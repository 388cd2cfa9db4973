"""A retrieval model round-trips through megatron's dist_checkpointing (per-layer keys: layers differ)."""

import torch

from megatron_ext.models import build_model
from tests.models.tiny import SEQ, VOCAB, tiny_config


def test_dist_checkpoint_round_trip(megatron_world, tmp_path):
    from megatron.core import dist_checkpointing

    config = tiny_config("swa [hsa swa] [hsa]", hsa_rank_decay=True)
    assert config.hetereogenous_dist_checkpoint
    model = build_model(config).eval()
    with torch.no_grad():
        model.decoder.layers[1].retrieval.rank_decay.fill_(0.3)  # a non-default value must survive
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ)[None]
    with torch.no_grad():
        expected = model(tokens, positions, None)
    sharded = model.sharded_state_dict()
    assert any("decoder.layers.1.chunk_memory" in k for k in sharded), "per-layer keys expected"
    dist_checkpointing.save(sharded, str(tmp_path))

    torch.manual_seed(7)
    fresh = build_model(config).eval()
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    assert fresh.decoder.layers[1].retrieval.rank_decay.item() == torch.tensor(0.3).item()
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens, positions, None), expected, rtol=0, atol=0)
