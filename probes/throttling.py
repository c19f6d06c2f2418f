"""Throttling: is this site slowed down because of its name, or its address?

Method (docs/throttling.md): resolve the host once, then run ``rounds`` pairs
of time-bounded, byte-capped downloads from the *same* address:

- ``target``: SNI = host, ``Host: host`` — what a browser sends;
- ``scrambled``: SNI = a random name under example.net (RFC 2606, never a real
  site) with certificate verification off, and the real ``Host`` header inside
  the encrypted channel, so the server still serves the page but an on-path
  censor only sees an unrelated name. This is the "scrambled" control of
  record-and-replay throttling studies: same server, same path, same bytes,
  different trigger. For ``http://`` URLs there is no SNI, so the scrambled
  variant can only change the ``Host`` header and the server may then serve
  something else; analysis checks that the two responses are comparable.

The pairs are interleaved in ABBA order (T S, S T, T S, ...) so that path
changes, cross traffic and per-destination TCP metrics caching hit both
variants alike. Concurrently, the control helper is asked for its own download
of the URL (``x_throughput`` extension of the TH request), the "fast from
elsewhere" evidence of address-based throttling.

Each download drives TLS by hand (``ssl.SSLObject`` over memory BIOs) on raw
asyncio streams, so that arrival times are those of *wire* bytes: asyncio's
SSL transport only hands out whole 16 KiB TLS records, which at 128 kbit/s
arrive once a second and would turn every throughput sample into 0 or a spike.

No interpretation here (analysis/throttling.py decides): each download is one
``x_throughput`` entry {side, variant, attempt, ip, server_name, failure,
bytes, seconds, kbit_per_s} plus ``x_`` details (arrival trace, per-bin
throughput samples, status code, why it stopped).
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import dns, failures, tls
from core.net import endpoint, is_ip
from .context import ProbeContext
from .records import Clock, Transactions, tcp_connect, tls_handshake

TEST_NAME = "throttling"
TEST_VERSION = "0.1.0"

USER_AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
SCRAMBLED_SUFFIX = "example.net"  # reserved by RFC 2606: no censor lists it, no site answers to it
ARRIVAL_GRANULARITY = 0.01  # arrivals are coalesced per 10 ms to bound the record's size
# A Vantage helper answers an ``x_throughput`` request within ``seconds`` plus
# this much (DNS, connect, TLS and the request: 5 s; closing: 1 s; see
# docs/helper.md). The probe's control timeout must leave room for it.
HELPER_OVERHEAD = 6.0
# On top of that: the POST round trip and a helper that queues the request.
CONTROL_SLACK = 5.0


@dataclass(frozen=True)
class Settings:
    """Knobs of the test; defaults are what `vantage run throttling` uses.

    4 rounds x 2 variants x 2 s keeps a URL under ~20 s while giving each
    variant 4 downloads (40 throughput samples of 200 ms when time-bound).
    The byte cap bounds a volunteer's data use to 8 x 2 MiB per URL."""

    rounds: int = 4
    download_seconds: float = 2.0
    max_bytes: int = 2 * 1024 * 1024
    bin_seconds: float = 0.2
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    helper_seconds: float = 3.0
    # From the start of the measurement. A helper answers within
    # helper_seconds + HELPER_OVERHEAD (9 s); 20 s leaves CONTROL_SLACK and the
    # probe's own DNS lookup on top, while a helper that never answers costs
    # at most ~2 s beyond our own (~17 s of time-bound) downloads.
    helper_timeout: float = 20.0
    helper_grace: float = 2.0     # after our own downloads, whatever the above

    def control_room(self) -> float:
        """Seconds the control timeout leaves beyond the helper's answer bound
        (negative: a conforming helper may be cut off)."""
        return self.helper_timeout - (self.helper_seconds + HELPER_OVERHEAD)


DEFAULT = Settings()


def new_test_keys() -> dict[str, Any]:
    return {
        "queries": [],
        "tcp_connect": [],
        "tls_handshakes": [],
        "x_throughput": [],
        "control": None,
        "control_failure": None,
        "x_control_helper": None,
        "x_probe_network_ok": None,
        "x_settings": None,
    }


def scrambled_name() -> str:
    """An unrelated, random, syntactically valid host name."""
    alphabet = string.ascii_lowercase + string.digits
    label = secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(alphabet) for _ in range(11))
    return f"{label}.{SCRAMBLED_SUFFIX}"


def build_request(path: str, host_header: str) -> bytes:
    """A minimal HTTP/1.1 GET. ``Connection: close`` lets the server's EOF mark
    the end of the body; ``identity`` keeps bytes on the wire = bytes of the page."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host_header}",
        f"User-Agent: {USER_AGENT}",
        "Accept: text/html,application/xhtml+xml,*/*;q=0.8",
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
    clock: Clock, txid: int = 1, settings: Settings = DEFAULT, keys: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One time-bounded download, measured exactly as the probe's own: the
    control helper uses it for its ``x_throughput`` sample so that both sides
    count the same bytes over the same interval. ``keys`` (optional) collects
    the tcp_connect / tls_handshakes entries. Setup takes at most
    ``connect_timeout + handshake_timeout``, reading ``download_seconds`` from
    the request, closing at most 1 s. Never raises for network outcomes."""
    scratch = keys if keys is not None else {"tcp_connect": [], "tls_handshakes": []}
    return await _download(ip, port, tls_context=tls_context, server_name=server_name, host_header=host_header,
                           path=path, clock=clock, txid=txid, settings=settings, keys=scratch)


async def _download(
    ip: str, port: int, *, tls_context: ssl.SSLContext | None, server_name: str | None, host_header: str, path: str,
    clock: Clock, txid: int, settings: Settings, keys: dict[str, Any],
) -> dict[str, Any]:
    """One connection, one GET, one ``x_throughput`` entry (never raises)."""
    d = _Download(clock, settings.max_bytes)
    failure: str | None = None
    t_request: float | None = None
    t_end: float | None = None
    t0 = clock.now()
    writer = None
    try:
        try:
            async with asyncio.timeout(settings.connect_timeout):
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
                async with asyncio.timeout(settings.handshake_timeout):
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
            async with asyncio.timeout(settings.download_seconds):
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
                    if d.wire_bytes >= settings.max_bytes:
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
        end = t_request + settings.download_seconds if t_request is not None else t_end
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
        "x_bin_seconds": settings.bin_seconds,
        "x_samples_kbit": throughput_bins(d.arrivals, end, settings.bin_seconds) if end is not None else [],
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


async def measure(url: str, ctx: ProbeContext, keys: dict[str, Any], clock: Clock | None = None,
                  settings: Settings | None = None) -> dict[str, Any]:
    """Measure ``url`` into ``keys`` (see new_test_keys); fills keys in place so
    that a measurement cut by the runner's deadline keeps what finished."""
    clock = clock or Clock()
    settings = settings or DEFAULT
    txids = Transactions()
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    default_port = port == (443 if https else 80)
    host_header = (f"[{host}]" if ":" in host else host) + ("" if default_port else f":{port}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    keys["x_settings"] = {
        "rounds": settings.rounds, "download_seconds": settings.download_seconds, "max_bytes": settings.max_bytes,
        "bin_seconds": settings.bin_seconds, "helper_seconds": settings.helper_seconds,
    }

    # 1. One address for every download: the comparison is "same server,
    #    different name", so the address must not change between variants.
    if is_ip(host):
        addresses = [host]
    else:
        query = await dns.system_lookup(host, clock=clock, txid=txids.next(), timeout=ctx.timeouts.dns)
        keys["queries"].append(query)
        addresses = dns.first_addresses([query])
    ipv4 = [a for a in addresses if ":" not in a]
    ip = (ipv4 or addresses or [None])[0]

    # 2. The helper's download, concurrently (it does not share our path).
    control_task = None
    if ctx.helpers and ctx.session is not None:
        from .control import query_control

        extra = {"x_throughput": {"seconds": settings.helper_seconds, "max_bytes": settings.max_bytes}}
        control_task = asyncio.ensure_future(query_control(
            ctx.helpers, url, [endpoint(ip, port)] if ip else [], session=ctx.session,
            timeout=settings.helper_timeout, extra=extra,
        ))
    elif not ctx.helpers:
        keys["control_failure"] = "no_helper_configured"
    else:
        keys["control_failure"] = "control_unreachable: no_session"

    try:
        if ip is not None:
            await _rounds(ip, port, https, host, host_header, path, ctx, keys, clock, txids, settings)
    finally:
        if control_task is not None:
            # The control only matters for throttle.ip: do not let a busy
            # helper double the test's duration. It gets `helper_timeout` from
            # the start, and at least `helper_grace` once our downloads end.
            budget = max(settings.helper_timeout - clock.now(), settings.helper_grace)
            done, _ = await asyncio.wait({control_task}, timeout=budget)
            if not done:
                control_task.cancel()
                await asyncio.gather(control_task, return_exceptions=True)
                response, helper, failure = None, None, f"control_unreachable: {failures.GENERIC_TIMEOUT}"
            else:
                response, helper, failure = control_task.result()
            keys["control"] = response
            keys["x_control_helper"] = helper
            keys["control_failure"] = failure
            if response is not None and not response.get("x_throughput"):
                # The helper answered but does not implement the extension.
                keys["control_failure"] = "control_no_throughput"
    keys["x_probe_network_ok"] = _network_ok(keys)
    return keys


async def _rounds(ip, port, https, host, host_header, path, ctx, keys, clock, txids, settings) -> None:
    target_ctx = ctx.tls() if https else None
    scrambled_ctx = tls.unverified_context(target_ctx) if https else None
    for attempt in range(settings.rounds):
        # ABBA order: neither variant always goes first.
        order = ("target", "scrambled") if attempt % 2 == 0 else ("scrambled", "target")
        round_failures = []
        for variant in order:
            if variant == "target":
                sni, header, tls_ctx = (host if https else None), host_header, target_ctx
            else:
                fake = scrambled_name()
                # https: only the SNI changes, the real Host travels encrypted.
                # http: nothing is encrypted, so the Host must change instead.
                sni, header, tls_ctx = (fake if https else None), (host_header if https else fake), scrambled_ctx
            entry = await _download(
                ip, port, tls_context=tls_ctx, server_name=sni, host_header=header, path=path, clock=clock,
                txid=txids.next(), settings=settings, keys=keys,
            )
            entry["variant"] = variant
            entry["attempt"] = attempt
            keys["x_throughput"].append(entry)
            round_failures.append(entry["failure"])
        # An address that refuses or drops both variants will not recover in
        # the next round: stop rather than spend the whole deadline timing out.
        if all(f is not None for f in round_failures) and any(
            f in (failures.CONNECTION_REFUSED, failures.GENERIC_TIMEOUT, failures.HOST_UNREACHABLE,
                  failures.NETWORK_UNREACHABLE) for f in round_failures):
            break


_OFFLINE = {failures.NETWORK_UNREACHABLE, failures.DNS_TEMPORARY, failures.HOST_UNREACHABLE}


def _network_ok(keys: dict[str, Any]) -> bool:
    """False when nothing worked and the failures say the probe is offline."""
    ops = keys["queries"] + keys["x_throughput"]
    if any(op.get("failure") is None for op in ops):
        return True
    return not ({op.get("failure") for op in ops} & _OFFLINE)


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def outcome_label(keys: dict[str, Any]) -> str:
    """A probe-side hint for the progress bar (the verdict is analysis's job)."""
    if keys.get("x_probe_network_ok") is False:
        return "no network"
    by_variant: dict[str, list[float]] = {"target": [], "scrambled": []}
    for e in keys.get("x_throughput") or []:
        if e.get("failure") is None and e.get("kbit_per_s") is not None and e.get("variant") in by_variant:
            by_variant[e["variant"]].append(e["kbit_per_s"])
    if not by_variant["target"]:
        return "target download failed" if keys.get("x_throughput") else "no download"
    if not by_variant["scrambled"]:
        return "scrambled download failed"
    target, scrambled = _median(by_variant["target"]), _median(by_variant["scrambled"])
    if scrambled and target <= 0.5 * scrambled:
        return "target slower"
    return "similar speed"
