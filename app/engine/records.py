"""Titles and metadata of runs and threads (PROTOCOL.md §5): set when one is created,
changed by a PATCH whose ``metadata`` is a JSON Merge Patch (RFC 7386). Metadata is a
JSON object of at most ``MAX_METADATA_BYTES`` encoded; a larger one is refused with
``payload_too_large`` (field ``metadata``), as a larger agent input is (field ``input``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from app.core.events import JsonObject, encode
from app.core.snapshot import merge_patch
from app.errors import PayloadTooLargeError

MAX_METADATA_BYTES: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class RecordPatch:
    """What a PATCH changes: the title when ``set_title`` (None clears it); the metadata
    by ``metadata``, a merge patch (None: unchanged)."""

    set_title: bool = False
    title: str | None = None
    metadata: JsonObject | None = None

    def apply(self, title: str | None, metadata: JsonObject) -> tuple[str | None, JsonObject]:
        """The title and metadata after this patch.

        Raises:
            PayloadTooLargeError: the metadata would be over the limit (field ``metadata``).
        """
        new_title = self.title if self.set_title else title
        if self.metadata is None:
            return new_title, metadata
        merged: JsonObject = merge_patch(metadata, self.metadata)
        check_metadata(merged)
        return new_title, merged


def check_metadata(metadata: JsonObject) -> None:
    """Raises: PayloadTooLargeError (field ``metadata``) past ``MAX_METADATA_BYTES``."""
    text = encode(metadata)
    size = len(text) if text.isascii() else len(text.encode())
    if size > MAX_METADATA_BYTES:
        raise PayloadTooLargeError(size, MAX_METADATA_BYTES, field="metadata")
