"""Reading the curated corpus: the Parquet shards a `curate` stage writes, split by split.

    <data>/train-00000.parquet, <data>/validation-00000.parquet, <data>/test-00000.parquet

Each shard has a `text` column. Readers stream record batches, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.errors import LmforgeError, reason
from lmforge.rundir import resolve_artifact

SPLITS = ("train", "validation", "test")


def split_shards(data: str | Path, split: str, *, required: bool = True) -> list[Path]:
    root = resolve_artifact(data, "curated data folder")
    if root.is_file():
        raise LmforgeError(f"{root} is a file; expected a curated data folder holding {split}-*.parquet shards.")
    shards = sorted(root.glob(f"{split}-*.parquet"))
    if not shards and required:
        raise LmforgeError(
            f"Curated data folder {root} has no {split}-*.parquet shards; run the curate stage on it first."
        )
    return shards


def iter_texts(data: str | Path, split: str, *, required: bool = True, batch_rows: int = 1024) -> Iterator[str]:
    """Yield the documents of one split in shard order."""
    for shard in split_shards(data, split, required=required):
        try:
            pf = pq.ParquetFile(shard)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise LmforgeError(f"Parquet shard {shard} cannot be read ({reason(e)}); re-run the curate stage.") from None
        if "text" not in pf.schema_arrow.names:
            raise LmforgeError(f"Parquet shard {shard} has no `text` column; re-run the curate stage.")
        kind = pf.schema_arrow.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise LmforgeError(f"Parquet shard {shard} column `text` holds {kind}, not text; write the documents as "
                               "strings (the curate stage does).")
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=["text"]):
                for t in batch.column(0).to_pylist():
                    if t:
                        yield t
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # a damaged string column: bad UTF-8
            raise LmforgeError(f"Parquet shard {shard} cannot be read ({reason(e)}); re-run the curate stage.") from None
