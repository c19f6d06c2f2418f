"""User configuration: the settings table and the config file (directories: core.paths).

Every setting is declared once in ``SETTINGS`` (name, type, default, help);
the TOML file, the ``VANTAGE_<NAME>`` environment overrides, validation and
``save_setting`` are all driven by that table, so adding a setting is one line.

Precedence, lowest to highest: built-in default < config file < environment.
Command-line options are applied by the caller on top of the returned Config.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import tomli_w

from core import paths
from core.errors import VantageError
from core.net import endpoint, parse_host_port

RESOLV_CONF = "/etc/resolv.conf"


class ConfigError(VantageError):
    """A configuration problem the user can fix (one line, exit 2 via the CLI)."""


# --------------------------------------------------------------------------
# Value checks. Each takes the already type-coerced value and returns the
# normalised value or raises ValueError with a short reason.


def parse_resolver(value: str) -> tuple[str, int]:
    """Split "ip", "ip:port", "v6" or "[v6]:port" into (ip, port)."""
    host, port = parse_host_port(value, 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"'{value}' is not an IP address (ip[:port]; a name would need DNS to find DNS)") from None
    return host, port


def _check_resolver(value: str) -> str:
    if value:
        parse_resolver(value)
    return value.strip()


def _check_url(value: str, schemes=("http", "https")) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"'{value}' is not an {'/'.join(schemes)} URL")
    return value.strip()


def _check_helpers(value: list) -> list:
    return [_check_url(str(v)) for v in value]


def _check_doh(value: str) -> str:
    return _check_url(value, ("https",)) if value else value


def _check_cc(value: str) -> str:
    value = value.strip().upper()
    if value and not re.fullmatch(r"[A-Z]{2}", value):
        raise ValueError(f"'{value}' is not a two-letter country code")
    return value


def _check_asn(value: str) -> str:
    value = value.strip().upper()
    if not value:
        return value
    m = re.fullmatch(r"(?:AS)?(\d{1,10})", value)
    if not m:
        raise ValueError(f"'{value}' is not an ASN like AS64496")
    return f"AS{int(m.group(1))}"


def _check_concurrency(value: int) -> int:
    if not 1 <= value <= 10000:
        raise ValueError("must be between 1 and 10000")
    return value


def _check_path(value: str) -> str:
    return os.path.expanduser(value.strip()) if value else value


# --------------------------------------------------------------------------
# Defaults that depend on the machine are computed when the config is loaded.


def default_resolver(resolv_conf: str | os.PathLike = RESOLV_CONF) -> str:
    """First usable ``nameserver`` of resolv.conf, or "" when there is none.

    This is the resolver the operating system uses, which is what a probe
    wants to measure (the ISP's). Zone ids (fe80::1%eth0) cannot be expressed
    as ip[:port] here, so such entries are skipped.
    """
    try:
        text = Path(resolv_conf).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            if "%" in fields[1]:
                continue
            try:
                ip = ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            return endpoint(str(ip), 53) if ip.version == 6 else str(ip)
    return ""


@dataclass(frozen=True)
class Setting:
    name: str
    type: type  # str, int, bool or list (of str)
    default: Any  # a value, or a zero-argument callable for machine-dependent ones
    help: str
    check: Callable[[Any], Any] | None = None

    def default_value(self) -> Any:
        value = self.default() if callable(self.default) else self.default
        return list(value) if isinstance(value, list) else value


SETTINGS: tuple[Setting, ...] = (
    Setting("db", str, lambda: str(paths.data_dir() / "vantage.duckdb"),
            "DuckDB file that stores measurements.", _check_path),
    Setting("helpers", list, [],
            "Control helper URLs (OONI test-helper protocol), tried in order.", _check_helpers),
    Setting("concurrency", int, 50,
            "How many inputs are measured at the same time.", _check_concurrency),
    Setting("resolver", str, lambda: default_resolver(),
            "UDP resolver to query, ip[:port] (default: first nameserver of /etc/resolv.conf).",
            _check_resolver),
    Setting("doh_url", str, "https://dns.google/dns-query",
            "DNS-over-HTTPS resolver used as an uncensored reference.", _check_doh),
    Setting("probe_cc", str, "",
            "Country code to record instead of the geolocated one (e.g. IR).", _check_cc),
    Setting("probe_asn", str, "",
            "ASN to record instead of the geolocated one (e.g. AS12880).", _check_asn),
    Setting("consent_given", bool, False,
            "The volunteer has read and accepted the risks of measuring."),
    Setting("extra_ca_file", str, "",
            "PEM file of extra trusted CAs (added to the system roots).", _check_path),
    Setting("geo_db", str, lambda: str(paths.cache_dir() / "geo"),
            "Directory holding asn.mmdb and country.mmdb.", _check_path),
    Setting("collector_url", str, "",
            "Collector to upload measurements to (OONI bk-003, e.g. https://collector.example.org).",
            lambda v: _check_url(v) if v else v),
    Setting("upload_after_run", bool, False,
            "Upload measurements to collector_url after each run (off until the volunteer agrees)."),
    Setting("consent_upload", bool, False,
            "The volunteer has read the consent notice on uploading and agrees: upload_after_run needs it."),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


def env_var(name: str) -> str:
    return f"{paths.APP.upper()}_{name.upper()}"


# --------------------------------------------------------------------------
# Coercion: TOML gives typed values; the environment and the command line give
# strings. Both go through here so the rules are the same everywhere.

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def coerce(setting: Setting, value: Any, where: str) -> Any:
    """Return the checked value of ``setting`` or raise ConfigError naming ``where``."""
    try:
        if setting.type is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError(f"'{value}' is not true/false")
                value = low in _TRUE
            elif not isinstance(value, bool):
                raise ValueError("must be true or false")
        elif setting.type is int:
            if isinstance(value, str):
                try:
                    value = int(value.strip())
                except ValueError:
                    raise ValueError(f"'{value}' is not a whole number") from None
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("must be a whole number")
        elif setting.type is list:
            if isinstance(value, str):
                # Environment/CLI form: comma- or space-separated.
                value = [v for v in re.split(r"[,\s]+", value) if v]
            elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("must be a list of strings")
        else:
            if not isinstance(value, str):
                raise ValueError("must be a string")
        if setting.check:
            value = setting.check(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {setting.name}: {exc}") from None
    return value


class Config:
    """Resolved settings; read them as attributes (``config.concurrency``).

    ``sources[name]`` says where each value came from ("default", the config
    file path, the environment variable or "command line").
    """

    def __init__(self, values: dict[str, Any], sources: dict[str, str], path: Path):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "sources", dict(sources))
        object.__setattr__(self, "path", path)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; use replace() or save_setting()")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **changes: Any) -> "Config":
        """A copy with command-line overrides applied (validated like the file)."""
        values, sources = dict(self._values), dict(self.sources)
        for name, value in changes.items():
            setting = _lookup(name, "command line")
            values[name] = coerce(setting, value, "command line")
            sources[name] = "command line"
        return Config(values, sources, self.path)

    def __repr__(self) -> str:
        return f"Config({self._values!r}, path={str(self.path)!r})"


def _lookup(name: str, where: str) -> Setting:
    setting = SETTINGS_BY_NAME.get(name)
    if setting is None:
        known = ", ".join(sorted(SETTINGS_BY_NAME))
        raise ConfigError(f"{where}: unknown setting '{name}' (known: {known})")
    return setting


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"{path}: unknown section [{key}] (the config file is flat: name = value)")
    return data


def load_config(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> Config:
    """Defaults, then the TOML file (missing file = defaults), then VANTAGE_<NAME>."""
    target = Path(path) if path else paths.config_path()
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    data = _read_file(target)
    for key in data:
        _lookup(key, str(target))  # unknown keys are errors: a typo must not be silently ignored
    for setting in SETTINGS:
        name = setting.name
        var = env_var(name)
        if var in env:
            values[name] = coerce(setting, env[var], var)
            sources[name] = var
        elif name in data:
            values[name] = coerce(setting, data[name], str(target))
            sources[name] = str(target)
        else:
            values[name] = setting.default_value()
            sources[name] = "default"
    return Config(values, sources, target)


# --------------------------------------------------------------------------
# Writing (tomli-w); the file stays flat, as _read_file requires.

HEADER = "# Vantage configuration (see `vantage --help`); written by vantage.\n"


def dump_toml(data: dict[str, Any]) -> str:
    """The config file's text: flat ``name = value`` lines, sorted by name."""
    for key, value in data.items():
        if isinstance(value, dict):
            raise TypeError(f"cannot write the table '{key}': the config file is flat")
    return HEADER + tomli_w.dumps({key: data[key] for key in sorted(data)})


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_setting(name: str, value: Any, path: str | os.PathLike | None = None) -> Any:
    """Validate ``value`` for setting ``name`` and store it in the config file.

    Strings are accepted for every type (as typed on a command line). Other
    keys already in the file are kept. Returns the stored (normalised) value.
    """
    target = Path(path) if path else paths.config_path()
    setting = _lookup(name, "save")
    stored = coerce(setting, value, "save")
    data = _read_file(target)
    data[name] = stored
    try:
        _atomic_write(target, dump_toml(data))
    except OSError as exc:
        raise ConfigError(f"cannot write the config file {target}: {exc.strerror or exc}") from None
    return stored


def describe_settings() -> list[dict[str, Any]]:
    """The settings table as data, for help screens and docs."""
    return [
        {"name": s.name, "type": s.type.__name__, "default": s.default_value(), "env": env_var(s.name), "help": s.help}
        for s in SETTINGS
    ]
