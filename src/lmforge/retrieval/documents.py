"""Documents to index: every record of the inputs, in the formats `curate` reads.

A Markdown or text file is one document; a JSONL/CSV/Parquet row is one document (its
`text_field`). A document's key is where it came from ("docs/a.md line 1", "faq.jsonl line 7"),
so re-reading the same inputs gives the same keys, and its sha256 says whether it changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from lmforge.data.formats import OnBadRows, ReadStats, iter_text_records
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Document:
    key: str  # "path line N": unique per input record, stable across re-reads
    text: str
    sha256: str


def read_documents(inputs: list[str], *, text_field: str = "text",
                   on_bad_rows: OnBadRows = "error") -> tuple[list[Document], ReadStats]:
    """Every non-blank document in `inputs` (files, folders, globs), in input order.

    Blank documents are skipped and counted (stats.skipped["blank document"]); no document
    at all is an error, as is a missing or empty folder (raised by the format reader).
    """
    stats = ReadStats()
    docs: list[Document] = []
    for text, rec in iter_text_records(inputs, text_field=text_field, on_bad_rows=on_bad_rows, stats=stats):
        if not text.strip():
            stats.skipped["blank document"] = stats.skipped.get("blank document", 0) + 1
            continue
        docs.append(Document(rec.where, text, hashlib.sha256(text.encode("utf-8")).hexdigest()))
    if not docs:
        raise LmforgeError(f"The documents {', '.join(map(str, inputs))} hold no text to index "
                           f"({stats.records} record(s) read, all blank or skipped).")
    return docs, stats
