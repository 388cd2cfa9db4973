"""Hugging Face side of the project: the decoder model as a ``transformers`` model, and the checkpoint converter
(``tools/convert_checkpoint_to_hf.py``). Importing this package registers ``model_type`` "megatron_hsa_gpt" with
``AutoConfig`` / ``AutoModelForCausalLM``. Needs ``transformers`` and ``safetensors`` (``pip install -e .[hf]``)."""

from megatron_ext.hf.configuration_hsa_gpt import HSAGPTConfig
from megatron_ext.hf.modeling_hsa_gpt import HSAGPTForCausalLM

__all__ = ["HSAGPTConfig", "HSAGPTForCausalLM"]


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(HSAGPTConfig.model_type, HSAGPTConfig)
        AutoModelForCausalLM.register(HSAGPTConfig, HSAGPTForCausalLM)
    except ValueError:  # already registered (a reload)
        pass


_register()
