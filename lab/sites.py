"""The lab's web sites: one aiohttp process in the internet namespace.

Every site gets its own address(es) from plan.SITE_NETWORK (``addresses = N``
gives N A records); ``geo_dns`` sites get a second set from
plan.GEO_CONTROL_NETWORK that the authoritative DNS hands to the control side.
The server listens on each address, ports 80 and 443, and picks the site by
the local address the connection arrived on (like a real host with one IP per
site), the TLS certificate by SNI. Certificates come from the lab CA.

Behaviours (LAB.md), all "for everyone" unless said otherwise:

- normal: an HTML page with the site's title, ``size`` bytes long.
- down: the address exists but nothing listens: every connect is refused, for
  the probe and the control alike.
- dynamic: same title, but tokens and a timestamp change on every request.
- slow: the body is paced server-side to ``rate_kbit``.
- server-block: HTTP 403 "Access denied in your region" to clients from the
  probe's networks, the normal page to everybody else (a geo-block).
- redirect: HTTP 301 to ``redirect_to``.
- server-block with ``block_from = "control"``: the 403 goes to the control
  network instead (many sites refuse data-centre addresses, where helpers live).
- flaky: the normal page; the share ``loss`` of new connections is dropped by
  iptables in the internet namespace (lab/runner.py, ``flaky_rules``), for everyone.

``ipv6 = true`` sites get as many IPv6 addresses (from plan.SITE_NETWORK6) as
IPv4 ones and are served on both. ``cdn = true`` sites get their probe-side
addresses from plan.CDN_PROBE_NETWORK(6) and their control-side ones from
plan.CDN_CONTROL_NETWORK(6): two prefixes of one autonomous system (lab/geodb.py).

Each response is held back 20-50 ms to emulate distance (tc here has no netem).

Run as ``python -m lab.sites CONFIG.json``; prints ``READY`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import random
import secrets
import ssl
import sys
import time
from pathlib import Path

from aiohttp import web

from . import plan
from .scenario import Scenario

# The probe's side of the lab (its own network and its ISP's), and the control's.
PROBE_NETWORKS = [ipaddress.ip_network(n) for n in plan.PROBE_NETWORKS]
CONTROL_NETWORKS = [ipaddress.ip_network(n) for n in plan.CONTROL_NETWORKS]
BLOCKED_NETWORKS = {"probe": PROBE_NETWORKS, "control": CONTROL_NETWORKS}
DELAY = (0.02, 0.05)
BLOCKED_TEXT = "Access denied in your region"


def assign_addresses(scenario: Scenario) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(addresses every resolver but the control's gets, control-side addresses
    of geo_dns and cdn sites). Each list holds the IPv4 addresses, then the
    IPv6 ones of an ipv6 site. Deterministic: the same scenario gets the same plan."""
    pools = {name: ipaddress.ip_network(getattr(plan, name)).hosts() for name in (
        "SITE_NETWORK", "GEO_CONTROL_NETWORK", "CDN_PROBE_NETWORK", "CDN_CONTROL_NETWORK",
        "SITE_NETWORK6", "GEO_CONTROL_NETWORK6", "CDN_PROBE_NETWORK6", "CDN_CONTROL_NETWORK6")}

    def take(pool: str, site) -> list[str]:
        v4 = [str(next(pools[pool])) for _ in range(site.addresses)]
        return v4 + ([str(next(pools[pool + "6"])) for _ in range(site.addresses)] if site.ipv6 else [])

    default: dict[str, list[str]] = {}
    control: dict[str, list[str]] = {}
    for site in scenario.sites:
        default[site.domain] = take("CDN_PROBE_NETWORK" if site.cdn else "SITE_NETWORK", site)
        if site.geo_dns:
            control[site.domain] = take("GEO_CONTROL_NETWORK", site)
        elif site.cdn:
            control[site.domain] = take("CDN_CONTROL_NETWORK", site)
    return default, control


def page(title: str, size: int, seed: str, *, dynamic: bool = False) -> bytes:
    """An HTML page of exactly ``size`` bytes (or the bare skeleton if larger)."""
    extra = ""
    if dynamic:
        # What changes between fetches of a dynamic site: tokens, a clock, an ad slot.
        extra = f"<p>session {secrets.token_hex(16)} at {time.time():.6f}</p><div class=ad>{secrets.token_hex(random.randint(8, 64))}</div>"
    head = f"<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>{title}</title></head>\n<body><h1>{title}</h1>{extra}\n<p>".encode()
    tail = b"</p></body></html>\n"
    room = size - len(head) - len(tail)
    if room <= 0:
        return head + tail
    # Filler text that is deterministic per site (so two fetches compare equal),
    # not a run of one byte (which compression or a diff would treat specially).
    words = []
    digest = hashlib.sha256(seed.encode()).digest()
    vocabulary = ["report", "city", "council", "weather", "market", "editorial", "sport", "letters", "archive", "science", "culture", "opinion"]
    i = 0
    length = 0
    while length < room:
        w = vocabulary[(digest[i % 32] + i) % len(vocabulary)]
        words.append(w)
        length += len(w) + 1
        i += 1
    filler = (" ".join(words) + " ").encode()[:room]
    return head + filler + tail


class SiteServer:
    def __init__(self, config: dict):
        self.sites = {s["domain"]: s for s in config["sites"]}
        self.by_address: dict[str, dict] = {}
        for s in config["sites"]:
            for ip in s["addresses"] + s.get("control_addresses", []):
                self.by_address[ip] = s
        self.bodies = {d: page(s["title"], s["size"], d) for d, s in self.sites.items() if s["behaviour"] in ("normal", "slow", "server-block", "flaky")}

    def site_for(self, request: web.Request) -> dict | None:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        site = self.by_address.get(sockname[0]) if sockname else None
        if site is None:
            site = self.sites.get((request.host or "").split(":")[0].lower())
        return site

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(random.uniform(*DELAY))
        site = self.site_for(request)
        if site is None:
            return web.Response(status=421, text="Misdirected request\n")
        behaviour = site["behaviour"]
        if behaviour == "redirect":
            return web.Response(status=301, headers={"Location": site["redirect_to"]}, text=f"Moved to {site['redirect_to']}\n")
        blocked = BLOCKED_NETWORKS.get(site.get("block_from") or "probe", PROBE_NETWORKS)
        if behaviour == "server-block" and request.remote and any(ipaddress.ip_address(request.remote) in n for n in blocked):
            body = f"<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body><h1>{BLOCKED_TEXT}</h1></body></html>\n"
            return web.Response(status=403, text=body, content_type="text/html")
        if behaviour == "dynamic":
            return web.Response(body=page(site["title"], site["size"], site["domain"], dynamic=True), content_type="text/html", headers={"Cache-Control": "no-store"})
        body = self.bodies[site["domain"]]
        if behaviour == "slow" and site.get("rate_kbit"):
            return await self.paced(request, body, site["rate_kbit"])
        return web.Response(body=body, content_type="text/html")

    async def paced(self, request: web.Request, body: bytes, rate_kbit: int) -> web.StreamResponse:
        """Send ``body`` at ``rate_kbit``: the server itself is slow, for everyone."""
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.content_length = len(body)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        bytes_per_second = rate_kbit * 1000 / 8
        tick = 0.05
        chunk = max(256, int(bytes_per_second * tick))
        start = time.monotonic()
        sent = 0
        while sent < len(body):
            piece = body[sent:sent + chunk]
            await resp.write(piece)
            sent += len(piece)
            # Sleep until the schedule says `sent` bytes are due, so timer jitter
            # does not accumulate into a lower rate.
            due = start + sent / bytes_per_second
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await resp.write_eof()
        return resp


def _contexts(config: dict) -> ssl.SSLContext:
    contexts: dict[str, ssl.SSLContext] = {}
    for s in config["sites"]:
        if not s.get("cert"):
            continue
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(s["cert"], s["key"])
        contexts[s["domain"]] = ctx
    default = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    first = next(iter(config["sites"]), None)
    if first and first.get("cert"):
        default.load_cert_chain(first["cert"], first["key"])

    def choose(sslobj, server_name, _ctx):
        # SNI picks the site's certificate; without SNI the default one is sent.
        if server_name and server_name.lower() in contexts:
            sslobj.context = contexts[server_name.lower()]

    default.sni_callback = choose
    return default


async def run(config: dict) -> None:
    server = SiteServer(config)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    tls = _contexts(config)
    for s in config["sites"]:
        if s["behaviour"] == "down":
            continue  # address assigned, nothing listening: connects are refused for everyone
        for ip in s["addresses"] + s.get("control_addresses", []):
            await web.TCPSite(runner, ip, 80, reuse_address=True).start()
            await web.TCPSite(runner, ip, 443, ssl_context=tls, reuse_address=True).start()
    print("READY", flush=True)
    await asyncio.Event().wait()


def config_for(scenario: Scenario, default: dict[str, list[str]], control: dict[str, list[str]], certs: dict[str, tuple[Path, Path]]) -> dict:
    return {
        "sites": [
            {
                "domain": s.domain,
                "behaviour": s.behaviour,
                "title": s.title,
                "size": s.size,
                "addresses": default[s.domain],
                "control_addresses": control.get(s.domain, []),
                "redirect_to": s.redirect_to,
                "rate_kbit": s.rate_kbit,
                "block_from": s.block_from,
                "loss": s.loss,
                "cert": str(certs[s.domain][0]) if s.domain in certs else None,
                "key": str(certs[s.domain][1]) if s.domain in certs else None,
            }
            for s in scenario.sites
        ]
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lab.sites")
    ap.add_argument("config")
    args = ap.parse_args(argv)
    config = json.loads(Path(args.config).read_text())
    try:
        asyncio.run(run(config))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"sites: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
