"""Facts about a fetched page that the answer carries: title, length, SHA-256
and a simhash fingerprint that survives small dynamic changes."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from probes.flatten import extract_title
from probes.records import body_bytes


# _BIT_SET[b]: bytes.translate table mapping a byte to 1 when its bit ``b`` is
# set, else 0 (counting the set bits of a digest column in C, not in Python).
_BIT_SET = [bytes((value >> bit) & 1 for value in range(256)) for bit in range(8)]
_WORD = re.compile(r"\w+")


def _digest(gram: str) -> bytes:
    return hashlib.blake2b(gram.encode(), digest_size=8).digest()


def simhash(body: bytes, shingle: int = 3) -> str:
    """64-bit simhash of the body's word shingles, as 16 hex digits. Pages that
    differ only in a timestamp or a token keep most bits, so analysis can tell
    "same page, dynamic bits" from "a different page" (a blockpage).

    Each shingle's 64-bit BLAKE2b votes +1 for its set bits and -1 for the
    others; a bit of the result is set when its votes are positive. The votes
    are counted a digest column at a time (byte i of every digest, in C),
    each distinct shingle hashed once: the same figure as the shingle-by-shingle
    sum (tests/test_helper.py checks), ~50x cheaper, since this runs on the
    event loop for every control request."""
    # The first 64 KiB say which page this is; hashing 512 KiB of one-letter
    # words costs seconds of event-loop time.
    words = _WORD.findall(body[:65536].decode("utf-8", "replace").lower())
    if not words:
        return "0" * 16
    if len(words) < shingle:
        grams = [" ".join(words)]
    else:
        grams = list(map(" ".join, zip(*(words[i:] for i in range(shingle)))))
    digests = {gram: _digest(gram) for gram in set(grams)}
    joined = b"".join(map(digests.__getitem__, grams))  # big-endian: byte 0 holds bits 63..56
    count = len(grams)
    result = 0
    for index in range(8):
        column = joined[index::8]
        shift = 8 * (7 - index)
        for bit in range(8):
            if 2 * column.translate(_BIT_SET[bit]).count(1) > count:  # more +1 than -1 votes
                result |= 1 << (shift + bit)
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
