"""TLS primitive: one handshake over a fresh TCP connection, one ``tls_handshakes`` entry.

The handshake is driven by hand (``ssl.SSLObject`` over memory BIOs) rather
than by asyncio's SSL transport, because asyncio reports a peer that closes
during the handshake as ``ConnectionResetError`` whether it sent a FIN or a
RST. Censors that reset after the ClientHello and servers that hang up are
different observations (``connection_reset`` vs ``eof_error``), so we read the
socket ourselves and see which one happened.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from . import failures
from core.net import endpoint
from .records import CertInfo, Clock, tls_handshake

# Validation failures after which the certificate is still worth capturing.
CERT_FAILURES = frozenset({
    failures.SSL_INVALID_HOSTNAME,
    failures.SSL_UNKNOWN_AUTHORITY,
    failures.SSL_INVALID_CERTIFICATE,
})


def make_context(extra_ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context: the system's default roots, plus the CA in
    ``extra_ca_file`` (the lab's CA, or a test CA) when given."""
    context = ssl.create_default_context()
    if extra_ca_file:
        context.load_verify_locations(cafile=extra_ca_file)
    # Only HTTP/1.1: the same context serves aiohttp, which cannot speak h2.
    context.set_alpn_protocols(["http/1.1"])
    return context


def unverified_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """A context that accepts any certificate, keeping the client's ALPN so
    the second ClientHello looks like the first."""
    loose = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    loose.minimum_version = context.minimum_version
    loose.set_alpn_protocols(["http/1.1"])
    return loose


async def drive_handshake(
    obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
) -> None:
    """Run a client handshake over plain streams by hand. asyncio's own TLS
    reports a clean close mid-handshake as a reset; here EOF stays EOF
    (``EOFError``) and a RST surfaces as ConnectionResetError."""
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    writer.write(pending)
                    await writer.drain()
                data = await reader.read(65536)
                if not data:
                    raise EOFError("peer closed the connection during the TLS handshake")
                incoming.write(data)
    finally:
        # Deliver our last flight, or the alert explaining why we gave up.
        pending = outgoing.read()
        if pending and not writer.is_closing():
            writer.write(pending)


async def _drive(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext, server_name: str,
) -> ssl.SSLObject:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name or None)
    await drive_handshake(obj, incoming, outgoing, reader, writer)
    return obj


async def _attempt(
    ip: str, port: int, server_name: str, context: ssl.SSLContext,
) -> ssl.SSLObject:
    reader, writer = await asyncio.open_connection(ip, port)
    try:
        return await _drive(reader, writer, context, server_name)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except Exception:  # a reset peer has nothing more to say
            pass




def _presented_chain(obj: ssl.SSLObject | None) -> list[bytes]:
    """The certificates the server sent, leaf first (DER). Python 3.13 has
    SSLObject.get_unverified_chain(); 3.11 and 3.12 have it on the underlying
    object only, so fall back to the leaf where neither exists."""
    if obj is None:
        return []
    getter = getattr(obj, "get_unverified_chain", None) or getattr(getattr(obj, "_sslobj", None), "get_unverified_chain", None)
    try:
        chain = getter() if getter else None
    except (ssl.SSLError, ValueError):
        chain = None
    if chain:
        out = []
        for cert in chain:
            der = cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER)
            out.append(der)
        return out
    leaf = obj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


async def handshake(
    ip: str, port: int, server_name: str, *, context: ssl.SSLContext, clock: Clock, txid: int, timeout: float,
) -> dict[str, Any]:
    """Connect to ``ip:port`` and handshake with SNI ``server_name``, verifying
    with ``context``. On a certificate failure, a second, unverified handshake
    records the certificate the server presented (``x_cert_valid`` False)."""
    t0 = clock.now()
    failure: str | None = None
    obj: ssl.SSLObject | None = None
    try:
        async with asyncio.timeout(timeout):
            obj = await _attempt(ip, port, server_name, context)
    except Exception as exc:
        failure = failures.classify(exc)
    t = clock.now()

    cert: CertInfo | None = None
    if obj is not None:
        der = obj.getpeercert(binary_form=True)
        cert = CertInfo.from_der(der, True, None) if der else None
    elif failure in CERT_FAILURES:
        try:
            async with asyncio.timeout(timeout):
                obj = await _attempt(ip, port, server_name, unverified_context(context))
            der = obj.getpeercert(binary_form=True)
            cert = CertInfo.from_der(der, False, failure) if der else None
        except Exception:  # the server went away in between: keep the first failure only
            obj = None
        if cert is None:
            cert = CertInfo(valid=False, error=failure)

    cipher = obj.cipher() if obj is not None else None
    return tls_handshake(
        chain=_presented_chain(obj),
        address=endpoint(ip, port),
        server_name=server_name,
        failure=failure,
        t0=t0,
        t=t,
        transaction_id=txid,
        tls_version=obj.version() if obj is not None else None,
        cipher_suite=cipher[0] if cipher else None,
        negotiated_protocol=obj.selected_alpn_protocol() if obj is not None else None,
        cert=cert,
    )
