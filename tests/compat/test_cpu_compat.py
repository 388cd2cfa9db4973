"""megatron-core's production training pieces run on the CPU once `compat.cpu.apply()` is in place."""

import pytest
import torch

from megatron_ext.compat import cpu as cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compatibility layer is a no-op with CUDA")


def _megatron_optimizer_steps():
    """Megatron DDP + distributed optimizer (grad clipping on) + the no-pipelining schedule, 3 steps."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True,
                               hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=16)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0,
                                                 use_distributed_optimizer=True), [model])
    config.finalize_model_grads_func = finalize_model_grads
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)[None, None]
    pos = torch.arange(16).expand(2, 16)

    def forward_step(data_iterator, model):
        out = model(tokens, pos, mask, labels=tokens)
        return out, lambda o: (o.float().sum(), torch.tensor(o.numel()), {"lm loss": o.float().mean().detach()})

    losses = []
    for _ in range(3):
        model.zero_grad_buffer()
        opt.zero_grad()
        result = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                             num_microbatches=1, seq_length=16, micro_batch_size=2)
        opt.step()
        losses.append(float(result[0]["lm loss"]))
    return losses


def _apply_twice():
    return cpu_compat.apply(), cpu_compat.apply(), torch.zeros(1, device="cuda").device.type


def test_apply_is_idempotent_and_maps_cuda_allocations_to_cpu():
    from megatron_ext.testing import run_on_ranks

    # In a rank of its own: apply() changes process-wide state that the rest of the suite should not inherit.
    assert run_on_ranks(_apply_twice, 1) == [(True, True, "cpu")]


def test_megatron_ddp_distributed_optimizer_and_schedule_train_on_cpu():
    from megatron_ext.testing import run_on_ranks

    [losses] = run_on_ranks(_megatron_optimizer_steps, 1)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[0]  # the optimizer really steps
