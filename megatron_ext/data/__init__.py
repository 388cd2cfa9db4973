"""Data: tokenizers, JSONL -> indexed-dataset preprocessing, the training data provider (blends, GCA landmark
insertion, chunk-aligned packing for HSA), synthetic long-context tasks and the bundled tiny corpus.

Import the submodules directly; this package imports nothing heavy so that preprocessing workers start fast.
See docs/data.md.
"""
