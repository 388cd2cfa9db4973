"""megatron-core modules: norms, SWA/full core attention, chunk encoder, retrieval, HSA/GCA attention, experts."""
