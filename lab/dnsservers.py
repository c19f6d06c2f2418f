"""The lab's DNS: one authoritative server and three forwarding resolvers.

- authoritative (198.18.53.1, internet ns): answers for every scenario domain
  (A, and AAAA for ipv6 sites; NODATA for AAAA of IPv4-only sites); for
  ``geo_dns`` and ``cdn`` sites it gives queries from the control network a
  different (equally valid) set of addresses than everybody else.
- public resolver (198.18.53.8, internet ns): forwards to the authoritative.
- ISP resolver (198.18.1.1, isp ns): the probe's system resolver. It forwards
  ACROSS THE CENSOR, so on-path injection and drops affect it as they affect a
  real ISP resolver, and it applies the resolver-level censor actions
  (dns-nxdomain, dns-redirect, dns-drop) itself.
- control resolver (198.18.4.2, control ns): forwards without crossing the censor.

Forwarders keep no cache (every probe query reaches the wire, so scenarios do
not depend on test order) and take the FIRST response that matches the query:
that is exactly how an injected answer, arriving before the genuine one,
poisons a real resolver.

Run as ``python -m lab.dnsservers CONFIG.json ROLE``; prints ``READY`` once
every socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import struct
import sys
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from . import plan

TTL = 60
FORWARD_TIMEOUT = 2.5  # then SERVFAIL, as a real resolver gives up on a silent upstream
CONTROL_NETWORKS = [ipaddress.ip_network(n) for n in plan.CONTROL_NETWORKS]
# A rule's `family` limits it to the queries of that family's record type.
FAMILY_RDTYPE = {"ipv4": dns.rdatatype.A, "ipv6": dns.rdatatype.AAAA}


def _matches(qname: str, domain: str) -> bool:
    return qname == domain or qname.endswith("." + domain)


@dataclass
class Zone:
    """domain -> addresses (IPv4 and IPv6 mixed); ``control`` overrides for
    geo_dns and cdn sites."""

    default: dict[str, list[str]] = field(default_factory=dict)
    control: dict[str, list[str]] = field(default_factory=dict)

    def lookup(self, qname: str, client_ip: str) -> list[str] | None:
        if qname not in self.default:
            return None
        if qname in self.control and any(ipaddress.ip_address(client_ip) in n for n in CONTROL_NETWORKS):
            return self.control[qname]
        return self.default[qname]


def _soa(origin: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(origin + ".", TTL, "IN", "SOA", f"ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 {TTL}")


def authoritative_answer(zone: Zone, query: dns.message.Message, client_ip: str) -> dns.message.Message:
    resp = dns.message.make_response(query)
    resp.flags |= dns.flags.AA
    resp.flags &= ~dns.flags.RA
    if not query.question:
        resp.set_rcode(dns.rcode.FORMERR)
        return resp
    q = query.question[0]
    qname = q.name.to_text(omit_final_dot=True).lower()
    addresses = zone.lookup(qname, client_ip)
    if addresses is None:
        resp.set_rcode(dns.rcode.NXDOMAIN)
        parent = next((d for d in zone.default if qname.endswith("." + d)), None)
        resp.authority.append(_soa(parent or qname.split(".", 1)[-1]))
        return resp
    wanted = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(q.rdtype)
    matching = [a for a in addresses if wanted and ipaddress.ip_address(a).version == wanted]
    if matching:
        resp.answer.append(dns.rrset.from_text_list(q.name, TTL, "IN", dns.rdatatype.to_text(q.rdtype), matching))
    elif q.rdtype == dns.rdatatype.SOA:
        resp.answer.append(_soa(qname))
    else:
        resp.authority.append(_soa(qname))  # NODATA (e.g. AAAA of an IPv4-only site)
    return resp


@dataclass
class Rule:
    action: str
    domain: str
    answer: str | None = None
    family: str | None = None  # None: A and AAAA (and every other type) alike

    def applies(self, rdtype: int) -> bool:
        return self.family is None or FAMILY_RDTYPE[self.family] == rdtype


class Forwarder:
    """A recursive-resolver stand-in that forwards every query to ``upstream``."""

    def __init__(self, upstream: str, rules: list[Rule] | None = None, name: str = "resolver"):
        self.upstream = upstream
        self.rules = rules or []
        self.name = name

    def rule_for(self, qname: str, rdtype: int = dns.rdatatype.A) -> Rule | None:
        for r in self.rules:
            if _matches(qname, r.domain) and r.applies(rdtype):
                return r
        return None

    async def resolve(self, wire: bytes) -> bytes | None:
        """The response to send for query ``wire``; None means stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        q = query.question[0]
        qname = q.name.to_text(omit_final_dot=True).lower()
        rule = self.rule_for(qname, q.rdtype)
        if rule is not None:
            log(f"{self.name}: {rule.action} {qname} {dns.rdatatype.to_text(q.rdtype)}")
            if rule.action == "dns-drop":
                return None
            resp = dns.message.make_response(query)
            resp.flags |= dns.flags.RA
            if rule.action == "dns-nxdomain":
                resp.set_rcode(dns.rcode.NXDOMAIN)
            elif rule.action == "dns-redirect" and rule.answer:
                # The forged address answers the query of its own family; the
                # other family's query gets an empty answer (NODATA).
                rdtype = dns.rdatatype.A if ipaddress.ip_address(rule.answer).version == 4 else dns.rdatatype.AAAA
                if q.rdtype == rdtype:
                    resp.answer.append(dns.rrset.from_text_list(q.name, TTL, "IN", dns.rdatatype.to_text(rdtype), [rule.answer]))
            return resp.to_wire()
        upstream_wire = await self.forward(query)
        if upstream_wire is None:
            resp = dns.message.make_response(query)
            resp.flags |= dns.flags.RA
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp.to_wire()
        # Hand back the upstream's answer under the client's id, with RA set.
        try:
            upstream_msg = dns.message.from_wire(upstream_wire)
        except Exception:
            return None
        upstream_msg.id = query.id
        upstream_msg.flags |= dns.flags.RA
        upstream_msg.flags &= ~dns.flags.AA
        return upstream_msg.to_wire()

    async def forward(self, query: dns.message.Message) -> bytes | None:
        loop = asyncio.get_running_loop()
        out = dns.message.make_query(query.question[0].name, query.question[0].rdtype)
        out.flags &= ~dns.flags.RD
        out.id = random.randrange(1, 65536)
        wire = out.to_wire()
        first: asyncio.Future = loop.create_future()
        upstream = self.upstream

        class _Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                # The FIRST plausible response wins, whoever really sent it.
                if addr[0] != upstream or len(data) < 12 or first.done():
                    return
                if struct.unpack("!H", data[:2])[0] != out.id:
                    return
                first.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(_Proto, remote_addr=(upstream, 53))
        try:
            transport.sendto(wire)
            data = await asyncio.wait_for(first, FORWARD_TIMEOUT)
        except asyncio.TimeoutError:
            log(f"{self.name}: upstream timeout for {query.question[0].name}")
            return None
        finally:
            transport.close()
        try:
            msg = dns.message.from_wire(data)
        except Exception:
            return None
        if msg.flags & dns.flags.TC:
            return await self._forward_tcp(wire)
        return data

    async def _forward_tcp(self, wire: bytes) -> bytes | None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.upstream, 53), FORWARD_TIMEOUT)
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), FORWARD_TIMEOUT))[0]
            data = await asyncio.wait_for(reader.readexactly(size), FORWARD_TIMEOUT)
            writer.close()
            return data
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _UDPServer(asyncio.DatagramProtocol):
    def __init__(self, handler):
        self.handler = handler
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        asyncio.get_running_loop().create_task(self._answer(data, addr))

    async def _answer(self, data, addr):
        resp = await self.handler(data, addr[0])
        if resp is not None:
            self.transport.sendto(resp, addr)


async def serve(listen: str, handler) -> None:
    """UDP and TCP port 53 on ``listen`` with ``handler(wire, client_ip) -> wire|None``."""
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: _UDPServer(handler), local_addr=(listen, 53))

    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        client = writer.get_extra_info("peername")[0]
        try:
            while True:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                resp = await handler(await reader.readexactly(size), client)
                if resp is None:
                    continue
                writer.write(struct.pack("!H", len(resp)) + resp)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    await asyncio.start_server(on_tcp, listen, 53)


def config_for(zone: Zone, rules: list[Rule]) -> dict:
    """The JSON config given to ``python -m lab.dnsservers`` (written by the runner)."""
    return {
        "zone": {"default": zone.default, "control": zone.control},
        "roles": {
            "internet": [
                {"kind": "authoritative", "listen": plan.AUTHORITATIVE_DNS},
                {"kind": "forwarder", "listen": plan.PUBLIC_RESOLVER, "upstream": plan.AUTHORITATIVE_DNS, "name": "public"},
            ],
            "isp": [
                {"kind": "forwarder", "listen": plan.ISP_RESOLVER, "upstream": plan.AUTHORITATIVE_DNS, "name": "isp",
                 "rules": [r.__dict__ for r in rules]},
            ],
            "control": [
                {"kind": "forwarder", "listen": plan.CONTROL_RESOLVER, "upstream": plan.AUTHORITATIVE_DNS, "name": "control"},
            ],
        },
    }


async def run(config: dict, role: str) -> None:
    zone = Zone(config["zone"]["default"], config["zone"].get("control", {}))
    for spec in config["roles"][role]:
        if spec["kind"] == "authoritative":
            async def handler(wire, client, zone=zone):
                try:
                    query = dns.message.from_wire(wire)
                except Exception:
                    return None
                return authoritative_answer(zone, query, client).to_wire()
        else:
            fwd = Forwarder(spec["upstream"], [Rule(**r) for r in spec.get("rules", [])], spec.get("name", "resolver"))

            async def handler(wire, client, fwd=fwd):
                return await fwd.resolve(wire)
        await serve(spec["listen"], handler)
    print("READY", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lab.dnsservers")
    ap.add_argument("config")
    ap.add_argument("role", choices=["internet", "isp", "control"])
    args = ap.parse_args(argv)
    with open(args.config) as f:
        config = json.load(f)
    try:
        asyncio.run(run(config, args.role))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
