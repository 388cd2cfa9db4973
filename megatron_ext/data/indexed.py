"""Writing megatron-core indexed datasets so that an interrupted write never looks complete.

``AtomicDatasetWriter(prefix, dtype)`` wraps ``IndexedDatasetBuilder``: data goes to ``{prefix}.bin.tmp``, the index
to ``{prefix}.idx.tmp``; ``commit()`` then removes any old ``{prefix}.idx``, renames the ``.bin`` and last the
``.idx``. Readers (``IndexedDataset.exists``) need both ``.bin`` and ``.idx``, so until the final rename no
dataset is visible at the prefix, and a killed process leaves only ``*.tmp`` files.
"""

from __future__ import annotations

import os


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class AtomicDatasetWriter:
    """``with AtomicDatasetWriter(prefix, dtype) as writer: writer.builder.add_document(...)`` commits on success
    and discards the temporary files on any exception (KeyboardInterrupt included)."""

    def __init__(self, prefix: str, dtype) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.bin_tmp, self.idx_tmp = prefix + ".bin.tmp", prefix + ".idx.tmp"
        self.builder = IndexedDatasetBuilder(self.bin_tmp, dtype=dtype)
        self.done = False

    def commit(self) -> None:
        self.builder.finalize(self.idx_tmp)  # closes the .bin, writes the index
        for path in (self.bin_tmp, self.idx_tmp):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        _remove(self.prefix + ".idx")  # never pair an old index with new data
        os.replace(self.bin_tmp, self.prefix + ".bin")
        os.replace(self.idx_tmp, self.prefix + ".idx")
        self.done = True

    def discard(self) -> None:
        if not self.done:
            self.builder.data_file.close()
            _remove(self.bin_tmp)
            _remove(self.idx_tmp)
            self.done = True

    def __enter__(self) -> "AtomicDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
