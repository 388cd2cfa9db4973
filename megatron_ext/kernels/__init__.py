"""Triton kernel families (HSA, GCA), each with a PyTorch reference, kernels and an autograd op."""
