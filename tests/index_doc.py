"""Reading and rewriting index files in tests, as FORMAT.md lays them out (version 2).

Tests that damage an index on purpose rewrite its body and give it a valid
checksum again, so that the reader's validation of the body is what they exercise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import google_crc32c

HEAD = b'{"format":"shardsave","format_version":2,"crc32c":"'
MID = b'","index":'


def body(raw: bytes) -> dict[str, Any]:
    """The index body (global_step, files, leaves, ...) of an index file's bytes."""
    return json.loads(raw)["index"]


def envelope(doc: dict[str, Any]) -> bytes:
    """An index file's bytes for a body, with its checksum."""
    encoded = json.dumps(doc, separators=(",", ":")).encode()
    return HEAD + b"%08x" % google_crc32c.value(encoded) + MID + encoded + b"}"


def read(prefix: str | Path) -> dict[str, Any]:
    return body(Path(f"{prefix}.index").read_bytes())


def rewrite(prefix: str | Path, change: Any) -> None:
    """Applies change(body) and writes the index back with a valid checksum."""
    doc = read(prefix)
    change(doc)
    Path(f"{prefix}.index").write_bytes(envelope(doc))
