#!/usr/bin/env python
"""Print a model's layer pattern and its parameter counts, computed from the built model.

    python tools/model_summary.py --config examples/swa_hsa_345m.yaml

Prints one line per layer and ends with ``total parameters: N`` and ``active parameters: N`` (per token: MoE routed
experts counted by top-k, shared experts in full). The model is built on the meta device, so even the 8B MoE needs
no memory.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="model YAML (examples/*.yaml)")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the YAML's vocab_size")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config):  # checked before megatron starts: one line, not a traceback
        parser.error(f"--config {args.config}: no such file; give a model YAML, e.g. examples/swa_hsa_345m.yaml")

    import torch

    from megatron_ext.compat import cpu as cpu_compat
    from megatron_ext.models import config_from_yaml
    from megatron_ext.models.summary import summarize
    from megatron_ext.testing import initialize_megatron_parallel, teardown_megatron_parallel

    cpu_compat.apply()
    if not torch.distributed.is_initialized():
        cpu_compat.init_process_group(0, 1, port=cpu_compat.free_port())  # never an inherited port
    initialize_megatron_parallel()
    try:
        config = config_from_yaml(args.config)
        print(summarize(config, args.vocab_size))
    finally:
        teardown_megatron_parallel()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
