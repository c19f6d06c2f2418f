"""The probe's side of the control: ask a Web Connectivity test helper (ts-017)
to measure the same URL from an uncensored network.

``query_control`` tries the configured helpers in order and moves on when one
errors, answers non-200, answers something that is not a JSON object, or is
slower than ``timeout``. It only awaits network I/O and keeps no shared state,
so the runner can start it alongside the probe's own DNS/TCP/TLS steps.

Failure strings (stored as ``test_keys.control_failure``):

- per helper: a failures.py string for network errors (``connection_refused``,
  ``generic_timeout_error``, ...), ``http_status_<code>`` for a non-200 answer,
  ``invalid_json`` / ``invalid_response`` for an unusable body,
  ``response_too_large`` past ``MAX_RESPONSE``;
- overall: ``control_unreachable: <failure of the last helper tried>``, or
  ``control_unreachable: no_helper_configured`` for an empty list.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import aiohttp

from core.net import REQUEST_HEADERS

from .failures import classify

# A helper's answer is a few KiB; a bigger one is a broken or hostile helper.
MAX_RESPONSE = 4 * 1024 * 1024

# Headers the helper should use for its fetch, in the TH protocol's
# name -> [values] form; the probe's own fetch uses the same ones so that the
# two responses are comparable.
# (Accept-Encoding is the fetcher's own business: each side decodes its body.)
DEFAULT_HEADERS = {name: [REQUEST_HEADERS[name]] for name in ("Accept", "Accept-Language", "User-Agent")}

# Sections every ts-017 response carries; an answer without them is not a TH.
_REQUIRED = ("dns", "tcp_connect", "http_request")


def control_request(url: str, endpoints: list[str], headers: dict[str, list[str]] | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ts-017 control request body (``x_`` extensions from ``extra``)."""
    body: dict[str, Any] = {
        "http_request": url,
        "http_request_headers": headers or DEFAULT_HEADERS,
        "tcp_connect": list(endpoints),
        "x_quic_enabled": False,
    }
    if extra:
        body.update(extra)
    return body


async def _ask(helper: str, body: dict[str, Any], *, session: aiohttp.ClientSession, timeout: float,
               ssl_context: ssl.SSLContext | None) -> tuple[dict[str, Any] | None, str | None]:
    try:
        async with asyncio.timeout(timeout):
            async with session.post(helper, json=body, ssl=ssl_context if ssl_context is not None else True,
                                    allow_redirects=False) as resp:
                if resp.status != 200:
                    return None, f"http_status_{resp.status}"
                raw = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    raw += chunk
                    if len(raw) > MAX_RESPONSE:
                        return None, "response_too_large"
    except Exception as exc:  # every network outcome becomes a failure string
        return None, classify(exc)
    try:
        data = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError):
        return None, "invalid_json"
    if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in _REQUIRED):
        return None, "invalid_response"
    return data, None


async def query_control(
    helpers: list[str],
    url: str,
    endpoints: list[str],
    *,
    session: aiohttp.ClientSession,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """Ask ``helpers`` in order; ``timeout`` bounds each attempt.

    Returns ``(response, helper_used, None)`` on the first usable answer, or
    ``(None, None, "control_unreachable: <last failure>")``.
    """
    body = control_request(url, endpoints, extra=extra)
    last = "no_helper_configured"
    for helper in helpers:
        response, failure = await _ask(helper, body, session=session, timeout=timeout, ssl_context=ssl_context)
        if response is not None:
            return response, helper, None
        last = failure or "unknown_failure: no answer"
    return None, None, f"control_unreachable: {last}"
