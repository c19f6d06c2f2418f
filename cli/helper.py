"""`vantage helper serve`: run the control helper."""

from __future__ import annotations

import asyncio
import tomllib
from typing import Any

import click

from core.errors import VantageError
from services.helper import HelperConfig, serve_forever
from services.helper import log as helper_log
from services.helper.config import HelperConfigError


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except UnicodeDecodeError as exc:
        raise VantageError(f"cannot read helper config {path}: not UTF-8 text (byte {exc.start})") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise VantageError(f"cannot read helper config {path}: {exc}") from None
    # Accept either top-level keys or a [helper] table, so the helper's settings
    # can live in a file shared with other services.
    return data.get("helper", data) if isinstance(data.get("helper"), dict) else data


@click.group()
def helper() -> None:
    """The control helper (OONI Web Connectivity test-helper protocol)."""


@helper.command()
@click.option("--listen", metavar="HOST:PORT", help="Address to listen on (default 127.0.0.1:8080; put a TLS reverse proxy in front).")
@click.option("--allow", "allow", multiple=True, metavar="CIDR",
              help="Accept targets in this network although it is not public (repeatable; the lab needs 198.18.0.0/15).")
@click.option("--max-inflight", type=click.IntRange(min=1), help="Control requests measured at once; more get 503 (default 50).")
@click.option("--rate-per-minute", type=click.IntRange(min=0), help="Requests per client address per minute; 0 disables (default 300).")
@click.option("--resolver", metavar="IP[:PORT]", help="UDP resolver for the helper's own lookups (default: the system resolver).")
@click.option("--doh-url", metavar="URL", help="Also resolve with this DoH server and report it in x_doh.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="Extra trusted CA (PEM), e.g. the lab's.")
@click.option("--asn-db", type=click.Path(exists=True, file_okay=False), help="Directory with a MaxMind ASN .mmdb for ip_info.asn.")
@click.option("--trust-forwarded-for", is_flag=True, default=None,
              help="Rate-limit by the last X-Forwarded-For entry (only behind your own reverse proxy).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML file with the same keys (listen, allow, max_inflight, ...); options override it.")
@click.option("--access-log", is_flag=True, default=None,
              help="Log one line per control request (status, duration; never client addresses nor URLs). "
                   "Without it: a summary a minute.")
@click.option("-v", "--verbose", is_flag=True, help="Log every control request (never client addresses), and INFO lines.")
def serve(listen, allow, max_inflight, rate_per_minute, resolver, doh_url, ca_file, asn_db, trust_forwarded_for,
          config_file, access_log, verbose) -> None:
    """Serve control requests until interrupted."""
    settings = _load_config(config_file)
    from_file = set(settings)
    overrides = {
        "listen": listen, "allow": list(allow) or None, "max_inflight": max_inflight,
        "rate_per_minute": rate_per_minute, "resolver": resolver, "doh_url": doh_url, "ca_file": ca_file,
        "asn_db": asn_db, "trust_forwarded_for": trust_forwarded_for, "access_log": access_log or verbose or None,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = HelperConfig.from_mapping(settings)
    except HelperConfigError as exc:
        where = f" (in {config_file})" if exc.key in from_file and overrides.get(exc.key) is None else ""
        raise VantageError(f"helper: {exc}{where}") from None
    except (TypeError, ValueError) as exc:
        raise VantageError(str(exc)) from None
    # Through a queue and a writer thread: a stderr nobody reads never blocks the loop.
    pipe = helper_log.configure(verbose)
    try:
        asyncio.run(serve_forever(config))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as exc:
        raise VantageError(f"helper: {exc}") from None
    finally:
        pipe.stop()
