"""A timed download: one connection, one GET, wire bytes timestamped as they
arrive, stopped at a deadline or a byte cap — one ``x_throughput`` entry.

The throttling test runs it for its target and scrambled variants, and the
control helper for its ``x_throughput`` sample, so both sides count the same
bytes over the same interval and send the same request.

TLS is driven by hand (``ssl.SSLObject`` over memory BIOs) on raw asyncio
streams, so that arrival times are those of *wire* bytes: asyncio's SSL
transport only hands out whole 16 KiB TLS records, which at 128 kbit/s arrive
once a second and would turn every throughput sample into 0 or a spike.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from core.net import REQUEST_HEADERS, USER_AGENT, endpoint, host_for_url

from . import failures, tls
from .records import Clock, tcp_connect, tls_handshake

ARRIVAL_GRANULARITY = 0.01  # arrivals are coalesced per 10 ms to bound the record's size


@dataclass(frozen=True)
class Bounds:
    """Setup takes at most ``connect_timeout + handshake_timeout``, reading
    ``seconds`` from the request (or until ``max_bytes`` wire bytes), closing
    at most 1 s. Samples are ``bin_seconds`` long."""

    seconds: float = 2.0
    max_bytes: int = 2 * 1024 * 1024
    bin_seconds: float = 0.2
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0


class Target(NamedTuple):
    host: str  # lower case, no brackets
    port: int
    https: bool
    host_header: str  # as the Host header writes it (port only when not the default)
    path: str  # path and query


def parse_target(url: str) -> Target:
    """Where and what a download of ``url`` asks for."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    default_port = port == (443 if https else 80)
    host_header = host_for_url(host) + ("" if default_port else f":{port}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(host, port, https, host_header, path)


def pick_address(addresses: list[str]) -> str | None:
    """The one address the downloads of a URL use, on the probe and on the
    helper alike: the first IPv4 one, else the first (docs/throttling.md)."""
    ipv4 = [a for a in addresses if ":" not in a]
    return (ipv4 or addresses or [None])[0]


def build_request(path: str, host_header: str) -> bytes:
    """A minimal HTTP/1.1 GET with the probe's request headers, except:
    ``Connection: close`` lets the server's EOF mark the end of the body, and
    ``identity`` keeps bytes on the wire = bytes of the page."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host_header}",
        f"User-Agent: {USER_AGENT}",
        f"Accept: {REQUEST_HEADERS['Accept']}",
        f"Accept-Language: {REQUEST_HEADERS['Accept-Language']}",
        "Accept-Encoding: identity",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


def throughput_bins(arrivals: list[tuple[float, int]], end: float, bin_seconds: float) -> list[float]:
    """Per-interval throughput (kbit/s) from the first byte to ``end``.

    Bins start at the first arrival so that connection latency is not counted
    as slowness (it is recorded separately as ``x_ttfb``). Empty bins inside
    the transfer are kept as 0: a stalled flow is slow. A trailing partial bin
    is scaled to its length when it covers at least a quarter of a bin (a
    sliver would turn one packet into a huge rate); a transfer shorter than one
    bin yields a single sample over its own duration."""
    if not arrivals:
        return []
    start = arrivals[0][0]
    span = max(end - start, 0.0)
    if span < bin_seconds:
        total = sum(n for _, n in arrivals)
        duration = max(span, 0.001)
        return [round(total * 8 / 1000 / duration, 3)]
    full = int(span / bin_seconds + 1e-9)
    tail = span - full * bin_seconds
    count = full + (1 if tail >= bin_seconds / 4 else 0)
    sums = [0] * (full + 1)
    for t, n in arrivals:
        # The epsilon keeps an arrival exactly on a bin edge in the later bin.
        index = min(int((t - start) / bin_seconds + 1e-9), full)
        sums[index] += n
    out = [sums[i] * 8 / 1000 / bin_seconds for i in range(full)]
    if count > full:
        out.append(sums[full] * 8 / 1000 / tail)
    elif full:
        # The sliver's bytes still happened: fold them into the last full bin.
        out[-1] += sums[full] * 8 / 1000 / bin_seconds
    return [round(v, 3) for v in out]


class _Download:
    """Reads one response, timestamping wire bytes, until EOF, the body's end,
    the byte cap or the deadline."""

    def __init__(self, clock: Clock, max_bytes: int):
        self.clock = clock
        self.max_bytes = max_bytes
        self.arrivals: list[tuple[float, int]] = []
        self.wire_bytes = 0
        self.plain = bytearray()  # decrypted response bytes (headers + body)
        self.header_end: int | None = None
        self.status: int | None = None
        self.content_length: int | None = None
        self.body_bytes = 0
        self.stopped: str | None = None
        self.location: str | None = None

    def record(self, n: int) -> None:
        now = self.clock.now()
        self.wire_bytes += n
        # Coalesce arrivals per 10 ms: enough resolution for 200 ms bins, and a
        # fast 2 MiB transfer stays a few hundred entries in the record.
        if self.arrivals and now - self.arrivals[-1][0] < ARRIVAL_GRANULARITY:
            t, total = self.arrivals[-1]
            self.arrivals[-1] = (t, total + n)
        else:
            self.arrivals.append((now, n))

    def feed_plain(self, data: bytes) -> None:
        if self.header_end is None:
            self.plain += data
            end = self.plain.find(b"\r\n\r\n")
            if end < 0:
                if len(self.plain) > 64 * 1024:
                    raise ValueError("response headers longer than 64 KiB")
                return
            self.header_end = end + 4
            self._parse_headers(bytes(self.plain[:end]))
            self.body_bytes = len(self.plain) - self.header_end
            del self.plain[self.header_end:]  # keep headers only: the body is not needed
        else:
            self.body_bytes += len(data)

    def _parse_headers(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError("not an HTTP response")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length" and value.strip().isdigit():
                self.content_length = int(value.strip())
            elif name == "location":
                self.location = value.strip()[:512]

    @property
    def body_complete(self) -> bool:
        return self.content_length is not None and self.body_bytes >= self.content_length


async def timed_download(
    ip: str, port: int, *, tls_context: ssl.SSLContext | None, server_name: str | None, host_header: str, path: str,
    clock: Clock, txid: int = 1, bounds: Bounds = Bounds(), keys: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One connection, one GET, one ``x_throughput`` entry; never raises for
    network outcomes. ``keys`` (optional) collects the tcp_connect /
    tls_handshakes entries."""
    keys = keys if keys is not None else {"tcp_connect": [], "tls_handshakes": []}
    d = _Download(clock, bounds.max_bytes)
    failure: str | None = None
    t_request: float | None = None
    t_end: float | None = None
    t0 = clock.now()
    writer = None
    try:
        try:
            async with asyncio.timeout(bounds.connect_timeout):
                reader, writer = await asyncio.open_connection(ip, port)
        except Exception as exc:
            failure = failures.classify(exc)
            raise
        finally:
            keys["tcp_connect"].append(tcp_connect(ip=ip, port=port, failure=failure, t0=t0, t=clock.now(), transaction_id=txid))

        sslobj = incoming = outgoing = None
        if tls_context is not None:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            sslobj = tls_context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
            th0 = clock.now()
            try:
                async with asyncio.timeout(bounds.handshake_timeout):
                    await tls.drive_handshake(sslobj, incoming, outgoing, reader, writer)
            except Exception as exc:
                failure = failures.classify(exc)
                raise
            finally:
                entry = tls_handshake(
                    address=endpoint(ip, port), server_name=server_name or "", failure=failure, t0=th0, t=clock.now(),
                    transaction_id=txid, tls_version=sslobj.version() if failure is None else None,
                    negotiated_protocol=sslobj.selected_alpn_protocol() if failure is None else None,
                )
                entry["no_tls_verify"] = tls_context.verify_mode == ssl.CERT_NONE
                keys["tls_handshakes"].append(entry)

        request = build_request(path, host_header)
        if sslobj is not None:
            sslobj.write(request)
            writer.write(outgoing.read())
        else:
            writer.write(request)
        await writer.drain()
        t_request = clock.now()

        # The time bound counts from the request: the test measures how fast
        # the response arrives, whatever the handshake cost.
        try:
            async with asyncio.timeout(bounds.seconds):
                while True:
                    data = await reader.read(65536)
                    if not data:
                        d.stopped = "eof"
                        break
                    d.record(len(data))
                    if sslobj is not None:
                        incoming.write(data)
                        if _drain_plain(sslobj, d):
                            d.stopped = "eof"
                            break
                        pending = outgoing.read()  # key updates, alerts
                        if pending:
                            writer.write(pending)
                    else:
                        d.feed_plain(data)
                    if d.body_complete:
                        d.stopped = "complete"
                        break
                    if d.wire_bytes >= bounds.max_bytes:
                        d.stopped = "max_bytes"
                        break
        except TimeoutError:
            d.stopped = "deadline"
        t_end = clock.now()
        if d.status is None and failure is None:
            failure = failures.EOF_ERROR if d.stopped == "eof" else failures.GENERIC_TIMEOUT
    except Exception as exc:  # every network outcome becomes the entry's failure
        if failure is None:
            failure = failures.classify(exc)
            t_end = clock.now()
    finally:
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except Exception:  # a reset or throttled peer has nothing more to say
                pass

    if d.stopped == "deadline":
        end = t_request + bounds.seconds if t_request is not None else t_end
    else:
        end = d.arrivals[-1][0] if d.arrivals else t_end
    seconds = (end - t_request) if (t_request is not None and end is not None) else None
    kbit = round(d.wire_bytes * 8 / 1000 / seconds, 3) if seconds and d.wire_bytes else (0.0 if seconds else None)
    return {
        "side": "probe",
        "ip": ip,
        "port": port,
        "server_name": server_name,
        "failure": failure,
        "bytes": d.wire_bytes,
        "seconds": round(seconds, 6) if seconds is not None else None,
        "kbit_per_s": kbit,
        "transaction_id": txid,
        "t0": t0,
        "t": clock.now(),
        "x_host_header": host_header,
        "x_status_code": d.status,
        "x_location": d.location,
        "x_content_length": d.content_length,
        "x_body_bytes": d.body_bytes,
        "x_stopped": d.stopped,
        "x_ttfb": round(d.arrivals[0][0] - t_request, 6) if d.arrivals and t_request is not None else None,
        "x_bin_seconds": bounds.bin_seconds,
        "x_samples_kbit": throughput_bins(d.arrivals, end, bounds.bin_seconds) if end is not None else [],
        # Arrival trace relative to the request: [seconds, bytes] per 10 ms.
        "x_arrivals": [[round(t - t_request, 4), n] for t, n in d.arrivals] if t_request is not None else [],
    }


def _drain_plain(sslobj: ssl.SSLObject, d: _Download) -> bool:
    """Decrypt what arrived; True when the server closed TLS (close_notify)."""
    while True:
        try:
            chunk = sslobj.read(65536)
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLZeroReturnError:
            return True
        if not chunk:
            return True
        d.feed_plain(chunk)
