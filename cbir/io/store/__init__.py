"""Columnar HDF5 stores for local features, global features and matches (format 1.x).

One file holds the data of many items (images, or image pairs) in a handful of
datasets: the keys (``names`` or ``pairs``), ``offsets`` (N+1, int64) into the
concatenated variable-length columns, and fixed-size per-item columns. One item
is one slice; a million images cost a few datasets, not a million groups.
The written specification is ``formats/SPEC.md``.

Writing is atomic and resumable: items are buffered and flushed as batch files
(``X.h5.batches/batch-NNNNNN.h5``, each renamed into place when complete), and
closing the writer merges the previous store and every batch into
``X.h5.partial``, then renames it over ``X.h5``. Buffered items are flushed when a
batch is full, every ``FLUSH_INTERVAL_S`` seconds, and when the writer stops on an
error, Ctrl-C or SIGTERM: a killed writer loses at most a few seconds of work, an
interrupted one only the item in flight; a re-run resumes from the batches written.

The package splits the concepts: :mod:`.schema` (kinds, columns, keys, version), :mod:`.reader`
(:class:`Store`), :mod:`.writer` (:class:`StoreWriter`, the resume rule), :mod:`.merge`
(contiguous merges, copies by the kernel) and :mod:`.checksums` (CRC-32 combination). What
users and the rest of cbir import is re-exported here.
"""

from __future__ import annotations

import time  # noqa: F401  (tests patch time.monotonic through it)

from .checksums import _COPY_BLOCK_BYTES, _row_blocks, crc32_combine
from .merge import CopyJob, MergePlan, copy_part, finish_merge, merge_stores, plan_merge
from .reader import (
                    Store,
                    _check_major,
                    _config_of,
                    check_attr_types,
                    check_match_indices,
                    check_matches_provenance,
                    open_store,
)
from .schema import (
                    CHECKSUMS,
                    FORMAT_MAJOR,
                    FORMAT_VERSION,
                    KEYS_BLOB,
                    SCHEMAS,
                    STR_DTYPE,
                    Column,
                    Key,
                    Schema,
                    encode_keys_blob,
                    image_keys,
                    pair_keys,
)
from .writer import FLUSH_INTERVAL_S, StoreWriter, present_keys, store_identity

__all__ = ["CHECKSUMS", "FLUSH_INTERVAL_S", "FORMAT_MAJOR", "FORMAT_VERSION", "KEYS_BLOB", "SCHEMAS", "STR_DTYPE",
           "Column", "CopyJob", "Key", "MergePlan", "Schema", "Store", "StoreWriter", "check_attr_types",
           "check_match_indices", "check_matches_provenance", "copy_part", "crc32_combine", "encode_keys_blob",
           "finish_merge", "image_keys", "merge_stores", "open_store", "pair_keys", "plan_merge", "present_keys",
           "store_identity", "_COPY_BLOCK_BYTES", "_check_major", "_config_of", "_row_blocks"]
