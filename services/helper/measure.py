"""One control measurement: the helper's own DNS lookup, TCP (and TLS) to the
probe's and its own addresses, the page fetch hop by hop through redirects,
and the ``x_throughput`` sample, all within the request's time budget.

Every address is checked against the target policy (core.net.Policy) before
any connection: after DNS, on each redirect, for probe-supplied endpoints;
each connection is pinned to the address that was checked.
"""

from __future__ import annotations

import asyncio
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import urljoin, urlsplit

from core import failures
from core.net import REDIRECT_CODES, Policy, endpoint, parse_ip, split_endpoint, url_host
from probes import dns, http, tcp, tls
from probes import web_connectivity as wc  # the probe's retry vocabulary: the same failures are retried
from probes.records import Clock, Transactions

from . import throughput
from .asn import AsnLookup
from .config import HelperConfig
from .page import page_facts
from .protocol import (
    MAX_URL, BadRequest, ControlRequest, dns_section, failed_http, failed_tls, http_section, ip_flags,
    normalize_url, tcp_entry, throughput_sample, tls_entry,
)

MAX_RESOLVED_ADDRESSES = 8
_MAX_ADDRESSES_PER_HOP = 3
# The helper re-measures too (a lossy path between it and the site must not
# read as the site being down): a connect, handshake or fetch that failed the
# way a lost connection fails is tried again, as the probe does
# (probes/web_connectivity.py), while the try can end within this share of the
# request's budget (24 of 30 s: one more try of a lost connect, handshake or
# fetch). One success on an endpoint makes it reachable.
RETRY_SHARE = 0.8


class Measurer:
    """Runs one control measurement; shared, read-only state across requests."""

    def __init__(self, config: HelperConfig):
        self.config = config
        self.policy = Policy.from_cidrs(config.allow)
        self.context = tls.make_context(config.ca_file)
        self.asn = AsnLookup(config.asn_db)

    async def resolve(self, host: str, clock: Clock, txids: Transactions) -> tuple[list[str], str | None]:
        """The helper's own lookup: A and AAAA, via the configured UDP resolver
        or getaddrinfo. Returns (addresses, failure)."""
        t = self.config.timeouts
        if self.config.resolver:
            results = await asyncio.gather(*(
                dns.udp_lookup(host, self.config.resolver, qtype, clock=clock, txid=txids.next(), timeout=t.dns, linger=0.0)
                for qtype in ("A", "AAAA")
            ))
            queries = [q for result in results for q in result]
        else:
            queries = [await dns.system_lookup(host, clock=clock, txid=txids.next(), timeout=t.dns)]
        addrs = dns.first_addresses(queries)
        if addrs:
            return addrs, None
        # Report the A lookup's failure: an AAAA-less domain is not a failure.
        return [], next((q["failure"] for q in queries if q["failure"]), failures.DNS_NO_ANSWER)

    async def doh(self, host: str, clock: Clock, txids: Transactions) -> list[dict[str, Any]]:
        import aiohttp

        if not self.config.doh_url:
            return []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.context)) as session:
            return list(await asyncio.gather(*(
                dns.doh_lookup(host, self.config.doh_url, qtype, session=session, clock=clock, txid=txids.next(),
                               timeout=self.config.timeouts.dns)
                for qtype in ("A", "AAAA")
            )))

    @staticmethod
    async def _retry(attempt: int, failure: str | None, retryable: frozenset, step: float, clock: Clock,
                     until: float | None) -> bool:
        """Wait the backoff and say True when a step that failed with ``failure``
        is tried again: the probe's rule (probes.web_connectivity.retry_gate)."""
        return await wc.retry_gate(attempt, failure, retryable, step, clock, until)

    async def _connect(self, ip: str, port: int, server_name: str | None, clock: Clock, txids: Transactions,
                       until: float | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """TCP (and TLS when server_name is given) to an address already checked;
        each retried (``until``: when retries must have ended, on ``clock``)."""
        t = self.config.timeouts
        attempt = 0
        while True:
            entry, streams = await tcp.connect(ip, port, clock=clock, txid=txids.next(), timeout=t.connect)
            await tcp.close(streams)
            if streams is not None or not await self._retry(attempt, entry["status"]["failure"], wc.TCP_RETRY, t.connect, clock, until):
                break
            attempt += 1
        tcp_result = tcp_entry(entry["status"]["success"], entry["status"]["failure"])
        if server_name is None:
            return tcp_result, None
        if not tcp_result["status"]:
            return tcp_result, failed_tls(server_name, tcp_result["failure"])
        attempt = 0
        while True:
            hs = await tls.handshake(ip, port, server_name, context=self.context, clock=clock, txid=txids.next(), timeout=t.tls)
            if not await self._retry(attempt, hs.get("failure"), wc.TLS_RETRY, t.tls, clock, until):
                break
            attempt += 1
        return tcp_result, tls_entry(hs)

    async def _fetch_chain(self, req: ControlRequest, first_addrs: list[str], first_failure: str | None,
                           clock: Clock, txids: Transactions, out: dict[str, Any], max_body: int | None = None,
                           until: float | None = None) -> None:
        """Follow redirects hop by hop, checking each hop's addresses against
        the policy before connecting, and pinning the connection to the checked
        address. Writes the final outcome into ``out['http']``."""
        url = req.url
        cookies: dict[str, dict[str, str]] = {}
        for index in range(self.config.max_redirects + 1):
            out["final_url"] = url
            try:
                host, ip_literal = url_host(url)  # as the client will connect (see protocol.normalize_url)
            except ValueError:
                out["http"] = failed_http(url, failures.HTTP_INVALID_REDIRECT)
                return
            if index == 0:
                addrs, failure = first_addrs, first_failure
            elif ip_literal is not None:
                addrs, failure = [str(ip_literal)], None
            else:
                addrs, failure = await self.resolve(host, clock, txids)
            if failure or not addrs:
                out["http"] = failed_http(url, failure or failures.DNS_NO_ANSWER)
                return
            allowed = [d.address for d in map(self.policy.check, addrs) if d.allowed]
            if not allowed:
                out["http"] = failed_http(url, failures.ADDRESS_REFUSED)
                return
            headers = dict(req.headers)
            jar = cookies.get(host.lower())
            if jar:
                headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
            entry: dict[str, Any] | None = None
            for ip in allowed[:_MAX_ADDRESSES_PER_HOP]:
                attempt = 0
                while True:
                    entries = await http.fetch(
                        url, clock=clock, transactions=txids, timeouts=self.config.timeouts, context=self.context,
                        pinned={host: ip}, max_redirects=0,
                        max_body=self.config.max_response_body if max_body is None else max_body,
                        headers=headers, events=[],
                    )
                    entry = entries[-1] if entries else None
                    # again only when nothing came back (a lost or cut connection)
                    if entry is None or entry.get("response") or not await self._retry(
                            attempt, entry.get("failure"), wc.HTTP_RETRY, self.config.timeouts.http, clock, until):
                        break
                    attempt += 1
                out["final_ip"] = ip
                if entry is None or entry.get("failure") not in tcp.ADDRESS_FAILURES:
                    break
            if entry is None:
                out["http"] = failed_http(url, failures.HTTP_REQUEST_FAILED)
                return
            response = entry.get("response") or {}
            if entry.get("failure") and not response:
                out["http"] = failed_http(url, entry["failure"])
                return
            location = _header(response.get("headers"), "Location")
            if response.get("code") in REDIRECT_CODES and location:
                _remember_cookies(cookies, host.lower(), response)
                next_url = urljoin(url, location.strip())
                try:
                    url = normalize_url(next_url)[0]
                except BadRequest:
                    out["http"] = failed_http(next_url[:MAX_URL], failures.HTTP_INVALID_REDIRECT)
                    return
                continue
            out["http"] = http_section(url, entry, page_facts(entry))
            return
        out["http"] = failed_http(url, failures.HTTP_TOO_MANY_REDIRECTS)

    async def measure(self, req: ControlRequest) -> dict[str, Any]:
        clock, txids = Clock(), Transactions()
        server_name = req.host
        tls_ports = {req.port} if req.scheme == "https" else set()
        tls_ports.add(443)  # probes validate addresses over 443 even for http:// URLs (ts-017 E001)

        tcp_out: dict[str, dict[str, Any]] = {}
        tls_out: dict[str, dict[str, Any]] = {}
        probe_ips: set[str] = set()
        state: dict[str, Any] = {}
        tasks: list[asyncio.Task] = []
        pending_keys: dict[asyncio.Task, tuple[str, bool]] = {}
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget = self.config.request_timeout
        fetch_body = None
        if req.throughput is not None:
            # The whole answer is bounded by the timed download's own bound:
            # a slow site must not make the probe's control request time out.
            budget = min(budget, throughput.answer_bound(req.throughput["seconds"]))
            fetch_body = min(self.config.max_response_body, throughput.FETCH_BODY)
        # No retries beside a timed download: another try would share its bandwidth.
        retry_until = budget * RETRY_SHARE if req.throughput is None else None

        def start_endpoint(key: str, ip_text: str, port: int) -> None:
            wants_tls = port in tls_ports
            decision = self.policy.check(ip_text)
            if not decision.allowed:
                tcp_out[key] = tcp_entry(False, failures.ADDRESS_REFUSED)
                if wants_tls:
                    tls_out[key] = failed_tls(server_name, failures.ADDRESS_REFUSED)
                return

            async def run() -> None:
                tcp_result, tls_result = await self._connect(decision.address, port, server_name if wants_tls else None, clock, txids,
                                                             until=retry_until)
                tcp_out[key] = tcp_result
                if tls_result is not None:
                    tls_out[key] = tls_result

            task = asyncio.ensure_future(run())
            pending_keys[task] = (key, wants_tls)
            tasks.append(task)

        # Probe endpoints do not depend on our DNS: start them right away.
        seen: set[tuple[str, int]] = set()
        for key in req.endpoints:
            ip_text, port = split_endpoint(key)
            canonical = self.policy.check_ip(parse_ip(ip_text)).address
            probe_ips.add(canonical)
            seen.add((canonical, port))
            start_endpoint(key, ip_text, port)

        async def dns_then_rest() -> None:
            if req.host_ip is not None:
                addrs, failure = [req.host_ip], None
            else:
                addrs, failure = await self.resolve(req.host, clock, txids)
            state["dns"] = dns_section(failure, addrs)
            # Bounded like the probe's (MAX_ADDRESSES): a name with thousands of
            # records must not turn one request into a connection flood.
            for ip in addrs[:MAX_RESOLVED_ADDRESSES]:
                canonical = self.policy.check(ip).address or ip
                if (canonical, req.port) not in seen:
                    seen.add((canonical, req.port))
                    start_endpoint(endpoint(ip, req.port), ip, req.port)
            if req.throughput is not None:
                # Concurrently with the page fetch, not after it.
                async def timed() -> None:
                    state["throughput"] = [await throughput.sample(
                        req, addrs, failure, policy=self.policy, context=self.context, timeouts=self.config.timeouts,
                        clock=clock, txids=txids,
                        setup_deadline=started + throughput.SETUP_SECONDS - throughput.MARGIN)]

                tasks.append(asyncio.ensure_future(timed()))
            await self._fetch_chain(req, addrs, failure, clock, txids, state, max_body=fetch_body, until=retry_until)

        main = asyncio.ensure_future(dns_then_rest())
        # (no task at all without a DoH server: x_doh is [] either way)
        doh = asyncio.ensure_future(self.doh(req.host, clock, txids)) if req.host_ip is None and self.config.doh_url else None
        deadline = started + budget
        try:
            async with asyncio.timeout_at(deadline):
                await main
                if doh is not None:
                    state["doh"] = await doh
                # Endpoint tasks started by dns_then_rest are in ``tasks`` by now.
                await asyncio.gather(*tasks)
        except TimeoutError:
            pass
        finally:
            for task in [main, doh, *tasks]:
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*(t for t in [main, doh, *tasks] if t is not None), return_exceptions=True)

        # Whatever did not finish within the request's time budget timed out.
        for task, (key, wants_tls) in pending_keys.items():
            tcp_out.setdefault(key, tcp_entry(False, failures.GENERIC_TIMEOUT))
            if wants_tls:
                tls_out.setdefault(key, failed_tls(server_name, failures.GENERIC_TIMEOUT))
        dns_out = state.get("dns") or dns_section(failures.GENERIC_TIMEOUT, [])
        http_out = state.get("http") or failed_http(state.get("final_url", req.url), failures.GENERIC_TIMEOUT)

        th_ips = {self.policy.check(a).address or a for a in dns_out["addrs"]}
        valid = {split_endpoint(k)[0] for k, v in tls_out.items() if v["status"]}
        valid = {self.policy.check(ip).address or ip for ip in valid}
        ip_info = {
            ip: {"asn": self.asn(ip), "flags": ip_flags(ip, probe_ips=probe_ips, th_ips=th_ips, valid=valid,
                                                         bogon=self.policy.is_bogon(ip))}
            for ip in sorted(probe_ips | th_ips)
        }

        response: dict[str, Any] = {
            "tcp_connect": tcp_out,
            "tls_handshake": tls_out,
            "quic_handshake": {},
            "http_request": http_out,
            "http3_request": None,
            "dns": dns_out,
            "ip_info": ip_info,
            "x_doh": state.get("doh") or [],
        }
        if req.throughput is not None:
            response["x_throughput"] = state.get("throughput") or [
                throughput_sample(server_name, dns_out["failure"] or failures.GENERIC_TIMEOUT)]
        return response


def _header(headers: Any, name: str) -> str | None:
    if not isinstance(headers, dict):
        return None
    for key, value in headers.items():
        if str(key).lower() == name.lower():
            return value[0] if isinstance(value, list) and value else (value if isinstance(value, str) else None)
    return None


def _remember_cookies(jar: dict[str, dict[str, str]], host: str, response: dict[str, Any]) -> None:
    """Keep cookies set by a redirect for later hops to the same host: sites
    that bounce through a cookie check otherwise loop until the redirect cap."""
    # headers_list keeps every Set-Cookie; the headers dict keeps only one.
    pairs = response.get("headers_list") or list((response.get("headers") or {}).items())
    values = [str(v) for k, v in pairs if str(k).lower() == "set-cookie"]
    for value in values:
        try:
            parsed = SimpleCookie(str(value))
        except CookieError:
            continue
        for name, morsel in parsed.items():
            jar.setdefault(host, {})[name] = morsel.value
