"""Parallelism for HSA/GCA models: global (layout-independent) views of weights and gradients, and the pieces the
layers call for tensor, context and pipeline parallelism."""
