"""Facts about a fetched page that the answer carries: title, length, SHA-256
and a simhash fingerprint that survives small dynamic changes."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from probes.flatten import extract_title
from probes.records import body_bytes


def simhash(body: bytes, shingle: int = 3) -> str:
    """64-bit simhash of the body's word shingles, as 16 hex digits. Pages that
    differ only in a timestamp or a token keep most bits, so analysis can tell
    "same page, dynamic bits" from "a different page" (a blockpage)."""
    # The first 64 KiB say which page this is; hashing 512 KiB of one-letter
    # words costs seconds of event-loop time.
    words = re.findall(r"\w+", body[:65536].decode("utf-8", "replace").lower())
    if not words:
        return "0" * 16
    grams = [" ".join(words[i:i + shingle]) for i in range(max(1, len(words) - shingle + 1))]
    weights = [0] * 64
    for gram in grams:
        value = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "big")
        for bit in range(64):
            weights[bit] += 1 if value >> bit & 1 else -1
    result = 0
    for bit in range(64):
        if weights[bit] > 0:
            result |= 1 << bit
    return f"{result:016x}"


def page_facts(entry: dict[str, Any]) -> dict[str, Any]:
    """title, body_length, sha256 and simhash of a probes.http record's body
    (the record's own figures when the fetch computed them)."""
    body = body_bytes((entry.get("response") or {}).get("body"))
    return {
        "title": entry.get("x_title") or extract_title(body) or "",
        "body_length": entry.get("x_body_length", len(body)),
        "sha256": entry.get("x_body_sha256") or hashlib.sha256(body).hexdigest(),
        "simhash": simhash(body),
    }
