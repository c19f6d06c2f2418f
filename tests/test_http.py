"""HTTP fetch primitive against the loopback web servers."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import tracemalloc

import pytest

import servers
from probes import failures, http, tls
from probes.records import Clock, Transactions, body_bytes
from probes.timeouts import Timeouts

pytestmark = pytest.mark.timeout(30)

FAST = Timeouts(connect=1.0, http=3.0)


async def get(url, *, timeouts=FAST, events=None, **kw):
    return await http.fetch(url, clock=Clock(), transactions=Transactions(), timeouts=timeouts,
                            events=[] if events is None else events, **kw)


async def test_page(http_server):
    events = []
    [entry] = await get(http_server.url("/"), events=events)
    assert entry["failure"] is None
    assert entry["response"]["code"] == 200
    assert entry["response"]["body"] == servers.PAGE.decode()
    assert entry["response"]["body_is_truncated"] is False
    assert entry["response"]["headers"]["Content-Type"].startswith("text/html")
    assert entry["x_title"] == servers.TITLE
    assert entry["x_body_length"] == len(servers.PAGE)
    assert entry["x_body_sha256"] == hashlib.sha256(servers.PAGE).hexdigest()
    assert entry["x_address"] == f"127.0.0.1:{http_server.port}"
    assert entry["x_redirect_index"] == 0 and entry["transaction_id"] == 1
    assert entry["request"]["method"] == "GET"
    assert entry["request"]["headers"]["User-Agent"].startswith("Mozilla/5.0")
    assert events and all(e["operation"] == "bytes_received" for e in events)
    assert sum(e["num_bytes"] for e in events) == len(servers.PAGE)
    assert all(e["transaction_id"] == 1 and e["address"] == entry["x_address"] for e in events)


@pytest.mark.parametrize("path", ["/gzip", "/deflate"])
async def test_decompressed(http_server, path):
    [entry] = await get(http_server.url(path))
    assert entry["response"]["headers"]["Content-Encoding"] in ("gzip", "deflate")
    assert entry["response"]["body"] == servers.PAGE.decode()
    assert entry["x_title"] == servers.TITLE


async def test_pinned_name_goes_to_measured_address(http_server, monkeypatch):
    # The name would not resolve (getaddrinfo is made to fail): the pin is what is used.
    def broken(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "patched")

    monkeypatch.setattr(socket, "getaddrinfo", broken)
    [entry] = await get(f"http://www.site.test:{http_server.port}/", pinned={"www.site.test": "127.0.0.1"})
    assert entry["failure"] is None
    assert entry["x_address"] == f"127.0.0.1:{http_server.port}"


async def test_unpinned_name_resolves_normally(http_server):
    [entry] = await get(http_server.url("/", host="localhost"), pinned={"other.test": "192.0.2.1"})
    assert entry["failure"] is None and entry["x_address"] == f"127.0.0.1:{http_server.port}"


async def test_dns_failure(monkeypatch):
    def broken(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "patched")

    monkeypatch.setattr(socket, "getaddrinfo", broken)
    [entry] = await get("http://blocked.test/")
    assert entry["failure"] == failures.DNS_NXDOMAIN
    assert entry["response"] == {} and entry["x_address"] is None


async def test_redirect_hops(http_server):
    entries = await get(http_server.url("/chain/2"))
    assert [e["x_redirect_index"] for e in entries] == [0, 1, 2]
    assert [e["response"]["code"] for e in entries] == [302, 302, 200]
    assert [e["request"]["url"] for e in entries] == [
        http_server.url("/chain/2"), http_server.url("/chain/1"), http_server.url("/"),
    ]
    assert [e["transaction_id"] for e in entries] == [1, 2, 3]
    assert entries[-1]["x_title"] == servers.TITLE
    assert all(e["failure"] is None for e in entries)


async def test_redirect_loop(http_server):
    entries = await get(http_server.url("/loop"))
    assert len(entries) == 11  # the first request and ten redirects followed
    assert entries[-1]["failure"] == failures.HTTP_TOO_MANY_REDIRECTS
    assert all(e["failure"] is None for e in entries[:-1])
    assert http_server.hits["/loop"] == 11


async def test_max_redirects_exact(http_server):
    entries = await get(http_server.url("/chain/3"), max_redirects=3)
    assert entries[-1]["failure"] is None and entries[-1]["response"]["code"] == 200
    entries = await get(http_server.url("/chain/3"), max_redirects=2)
    assert len(entries) == 3 and entries[-1]["failure"] == failures.HTTP_TOO_MANY_REDIRECTS


async def test_invalid_redirect(http_server):
    [entry] = await get(http_server.url("/bad-redirect"))
    assert entry["failure"] == failures.HTTP_INVALID_REDIRECT
    assert entry["response"]["code"] == 302


async def test_large_body_truncated(http_server):
    [entry] = await get(http_server.url("/large"))
    assert entry["failure"] is None
    assert entry["response"]["body_is_truncated"] is True
    assert entry["x_body_length"] == http.MAX_BODY
    assert len(body_bytes(entry["response"]["body"])) == http.MAX_BODY


async def test_body_exactly_at_cap_not_truncated(http_server):
    [entry] = await get(http_server.url("/"), max_body=len(servers.PAGE))
    assert entry["response"]["body_is_truncated"] is False
    [entry] = await get(http_server.url("/"), max_body=len(servers.PAGE) - 1)
    assert entry["response"]["body_is_truncated"] is True


async def test_gzip_bomb_capped(http_server):
    servers.gzip_bomb()  # build the server's payload before measuring our own memory
    tracemalloc.start()
    try:
        [entry] = await get(http_server.url("/bomb"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entry["failure"] is None
    assert entry["response"]["body_is_truncated"] is True
    assert entry["x_body_length"] == http.MAX_BODY
    assert body_bytes(entry["response"]["body"]) == bytes(http.MAX_BODY)
    # Decompression never held more than a few caps' worth, nowhere near 50 MB.
    assert peak < 8 * 1024 * 1024


async def test_trickle_hits_total_deadline(http_server):
    events = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    [entry] = await get(http_server.url("/trickle"), timeouts=Timeouts(connect=1.0, http=0.6), events=events)
    assert entry["failure"] == failures.GENERIC_TIMEOUT
    assert loop.time() - start < 2.0
    assert entry["response"]["code"] == 200
    assert entry["x_body_length"] >= 3 and set(entry["response"]["body"]) == {"x"}
    assert len(events) >= 3
    times = [e["t"] for e in events]
    assert times == sorted(times)


async def test_connection_refused():
    [entry] = await get(f"http://127.0.0.1:{servers.closed_port()}/")
    assert entry["failure"] == failures.CONNECTION_REFUSED
    assert entry["response"] == {} and entry["x_body_length"] is None


async def test_connect_timeout():
    with servers.Blackhole() as port:
        [entry] = await get(f"http://127.0.0.1:{port}/", timeouts=Timeouts(connect=0.3, http=3.0))
    assert entry["failure"] == failures.GENERIC_TIMEOUT


async def test_reset_before_response(http_server):
    [entry] = await get(http_server.url("/reset"))
    assert entry["failure"] == failures.CONNECTION_RESET


async def test_server_closes_without_response(eof_server):
    [entry] = await get(f"http://127.0.0.1:{eof_server.port}/")
    assert entry["failure"] == failures.EOF_ERROR


async def test_silent_server_times_out(silent_server):
    [entry] = await get(f"http://127.0.0.1:{silent_server.port}/", timeouts=Timeouts(connect=1.0, http=0.4))
    assert entry["failure"] == failures.GENERIC_TIMEOUT


async def test_https_with_extra_ca(https_server, pki):
    [entry] = await get(https_server.url("/", host="localhost"), context=tls.make_context(pki.ca_file))
    assert entry["failure"] is None and entry["x_title"] == servers.TITLE


async def test_https_pinned(https_server, pki):
    url = f"https://localhost:{https_server.port}/redirect"
    entries = await get(url, context=tls.make_context(pki.ca_file), pinned={"localhost": "127.0.0.1"})
    assert [e["response"]["code"] for e in entries] == [302, 200]
    assert all(e["x_address"] == f"127.0.0.1:{https_server.port}" for e in entries)


async def test_https_unknown_authority_without_extra_ca(https_server):
    [entry] = await get(https_server.url("/", host="localhost"), context=tls.make_context())
    assert entry["failure"] == failures.SSL_UNKNOWN_AUTHORITY


@pytest.fixture(
    params=[
        ("expired", failures.SSL_INVALID_CERTIFICATE),
        ("unknown_authority", failures.SSL_UNKNOWN_AUTHORITY),
        ("wrong_host", failures.SSL_INVALID_HOSTNAME),
    ],
    ids=lambda p: p[0],
)
async def bad_cert_case(request, pki):
    name, failure = request.param
    async with servers.RawServer("tls", pki.server_context(getattr(pki, name))) as server:
        yield server, failure


async def test_https_certificate_failures(bad_cert_case, pki):
    server, failure = bad_cert_case
    [entry] = await get(f"https://localhost:{server.port}/", context=tls.make_context(pki.ca_file))
    assert entry["failure"] == failure
    assert entry["response"] == {}


async def test_https_reset_after_client_hello(rst_server, pki):
    [entry] = await get(f"https://localhost:{rst_server.port}/", context=tls.make_context(pki.ca_file))
    assert entry["failure"] == failures.CONNECTION_RESET


def test_extract_title():
    assert http.extract_title(b"<html><TITLE lang=en>\n A &amp; B\n</title>") == "A & B"
    assert http.extract_title(b"<title>caf\xe9</title>", "text/html; charset=iso-8859-1") == "caf\u00e9"
    assert http.extract_title(b"no title here") is None


@pytest.mark.parametrize(("path", "failure"), [("/cut", failures.EOF_ERROR), ("/cut-reset", failures.CONNECTION_RESET)])
async def test_body_cut_short_keeps_bytes(http_server, path, failure):
    events = []
    [entry] = await get(http_server.url(path), events=events)
    assert entry["failure"] == failure
    assert entry["response"]["code"] == 200
    assert entry["response"]["body"] == "y" * 100
    assert sum(e["num_bytes"] for e in events) == 100
