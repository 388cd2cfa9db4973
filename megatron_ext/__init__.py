"""HSA/GCA sparse attention for ultra-long-context pretraining on megatron-core."""

__version__ = "0.1.0"
