"""probes.config (settings table, TOML I/O, env overrides), core.paths and probes.consent (+ cli.consent)."""

from __future__ import annotations

import tomllib

import click
import pytest

from cli import consent as cli_consent
from core import paths
from probes import config as cfg
from probes import consent
from probes.config import ConfigError, load_config, save_setting


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    for setting in cfg.SETTINGS:
        monkeypatch.delenv(cfg.env_var(setting.name), raising=False)
    monkeypatch.delenv("VANTAGE_CONFIG", raising=False)
    return tmp_path


def test_directories_follow_xdg(tmp_path, monkeypatch):
    assert paths.config_dir() == tmp_path / "xdg_config_home" / "vantage"
    assert paths.data_dir() == tmp_path / "xdg_data_home" / "vantage"
    assert paths.cache_dir() == tmp_path / "xdg_cache_home" / "vantage"
    assert paths.config_path() == paths.config_dir() / "config.toml"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid per the spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_dir() == tmp_path / "home" / ".cache" / "vantage"


def test_defaults_without_a_file():
    config = load_config()
    assert config.concurrency == 50
    assert config.helpers == []
    assert config.doh_url == "https://dns.google/dns-query"
    assert config.consent_given is False
    assert config.probe_cc == "" and config.probe_asn == ""
    assert config.db == str(paths.data_dir() / "vantage.duckdb")
    assert config.geo_db == str(paths.cache_dir() / "geo")
    assert config.sources["concurrency"] == "default"
    assert set(config.as_dict()) == set(cfg.SETTINGS_BY_NAME)


def test_settings_table_covers_required_names():
    names = set(cfg.SETTINGS_BY_NAME)
    assert {"db", "helpers", "concurrency", "resolver", "doh_url", "probe_cc", "probe_asn",
            "consent_given", "extra_ca_file", "geo_db"} <= names
    for row in cfg.describe_settings():
        assert row["help"] and row["env"] == "VANTAGE_" + row["name"].upper()


def test_default_resolver_reads_resolv_conf(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example\nnameserver fe80::1%eth0\nnameserver 192.0.2.53\nnameserver 8.8.8.8\n")
    assert cfg.default_resolver(conf) == "192.0.2.53"
    conf.write_text("nameserver 2001:db8::53\n")
    assert cfg.default_resolver(conf) == "[2001:db8::53]:53"
    assert cfg.default_resolver(tmp_path / "missing") == ""


@pytest.mark.parametrize("text,expected", [
    ("192.0.2.1", ("192.0.2.1", 53)),
    ("192.0.2.1:5353", ("192.0.2.1", 5353)),
    ("2001:db8::1", ("2001:db8::1", 53)),
    ("[2001:db8::1]:853", ("2001:db8::1", 853)),
])
def test_parse_resolver(text, expected):
    assert cfg.parse_resolver(text) == expected


@pytest.mark.parametrize("bad", ["dns.google", "1.2.3.4:0", "1.2.3.4:x", "[::1", "[::1]x"])
def test_parse_resolver_rejects(bad):
    with pytest.raises(ValueError):
        cfg.parse_resolver(bad)


def test_file_values_and_normalisation(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'concurrency = 8\nhelpers = ["https://th.example.org"]\nprobe_cc = "ir"\n'
        'probe_asn = "12880"\nconsent_given = true\nresolver = "192.0.2.1:53"\n'
    )
    config = load_config(path)
    assert config.concurrency == 8
    assert config.helpers == ["https://th.example.org"]
    assert config.probe_cc == "IR"
    assert config.probe_asn == "AS12880"
    assert config.consent_given is True
    assert config.sources["concurrency"] == str(path)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("concurency = 8\n")
    with pytest.raises(ConfigError, match="unknown setting 'concurency'"):
        load_config(path)


@pytest.mark.parametrize("body,needle", [
    ('concurrency = "many"', "concurrency"),
    ("concurrency = 0", "concurrency"),
    ("concurrency = true", "concurrency"),
    ('helpers = ["https://x", 3]', "helpers"),
    ('helpers = ["ftp://x"]', "helpers"),
    ('probe_cc = "IRN"', "probe_cc"),
    ('probe_asn = "ASX"', "probe_asn"),
    ('doh_url = "http://dns.example/dns-query"', "doh_url"),
    ('consent_given = "maybe"', "consent_given"),
    ("[section]\nx = 1", "section"),
    ("concurrency = ", "not valid TOML"),
])
def test_bad_values_are_one_line_errors(tmp_path, body, needle):
    path = tmp_path / "c.toml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_env_overrides_file(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text("concurrency = 8\n")
    monkeypatch.setenv("VANTAGE_CONCURRENCY", "3")
    monkeypatch.setenv("VANTAGE_HELPERS", "https://a.example, https://b.example")
    monkeypatch.setenv("VANTAGE_CONSENT_GIVEN", "yes")
    monkeypatch.setenv("VANTAGE_DB", str(tmp_path / "x.duckdb"))
    config = load_config(path)
    assert config.concurrency == 3
    assert config.helpers == ["https://a.example", "https://b.example"]
    assert config.consent_given is True
    assert config.db == str(tmp_path / "x.duckdb")
    assert config.sources["concurrency"] == "VANTAGE_CONCURRENCY"
    monkeypatch.setenv("VANTAGE_CONCURRENCY", "lots")
    with pytest.raises(ConfigError, match="VANTAGE_CONCURRENCY"):
        load_config(path)


def test_vantage_config_env_points_at_file(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.toml"
    path.write_text("concurrency = 7\n")
    monkeypatch.setenv("VANTAGE_CONFIG", str(path))
    assert load_config().concurrency == 7


def test_config_is_read_only_and_replace_validates():
    config = load_config()
    with pytest.raises(AttributeError):
        config.concurrency = 3
    other = config.replace(concurrency="5", probe_cc="de")
    assert other.concurrency == 5 and other.probe_cc == "DE" and config.concurrency == 50
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        config.replace(nope=1)


def test_save_setting_round_trips_and_keeps_other_keys(tmp_path):
    path = tmp_path / "sub" / "c.toml"
    save_setting("concurrency", "12", path=path)
    save_setting("helpers", ["https://a.example/", "https://b.example/"], path=path)
    save_setting("consent_given", True, path=path)
    save_setting("extra_ca_file", 'C:\\odd "name"\n.pem', path=path)
    data = tomllib.loads(path.read_text())
    assert data == {
        "concurrency": 12,
        "helpers": ["https://a.example/", "https://b.example/"],
        "consent_given": True,
        "extra_ca_file": 'C:\\odd "name"\n.pem',
    }
    config = load_config(path)
    assert config.concurrency == 12 and config.consent_given is True
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_save_setting_rejects_bad_input(tmp_path):
    path = tmp_path / "c.toml"
    with pytest.raises(ConfigError, match="unknown setting"):
        save_setting("colour", "blue", path=path)
    with pytest.raises(ConfigError, match="concurrency"):
        save_setting("concurrency", "-1", path=path)
    assert not path.exists()


def test_toml_writer_escapes_and_round_trips():
    data = {"a": "tab\there \x01 \x7f é \\ \"q\"", "b": 0, "c": False, "d": [], "e": ["x", "y"], "f": 1.5}
    assert tomllib.loads(cfg.dump_toml(data)) == data
    with pytest.raises(TypeError):
        cfg.dump_toml({"nested": {"x": 1}})


# ---------------------------------------------------------------- consent


def test_consent_already_given(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("consent_given = true\n")
    assert consent.ensure_consent(load_config(path), assume_yes=False, interactive=False) is True


def test_consent_yes_records(tmp_path):
    path = tmp_path / "c.toml"
    assert consent.ensure_consent(load_config(path), assume_yes=True, interactive=False) is True
    assert load_config(path).consent_given is True


def test_consent_non_interactive_without_yes_refuses(tmp_path):
    path = tmp_path / "c.toml"
    assert consent.ensure_consent(load_config(path), assume_yes=False, interactive=False) is False
    assert not path.exists()
    assert "\n" not in consent.NO_CONSENT_MESSAGE


@pytest.mark.parametrize("answer,expected", [("y\n", True), ("n\n", False), ("\n", False)])
def test_consent_interactive(tmp_path, answer, expected):
    path = tmp_path / "c.toml"

    @click.command()
    def cmd():
        ok = cli_consent.ensure_consent(load_config(path), assume_yes=False, interactive=True)
        click.echo(f"result={ok}")

    from click.testing import CliRunner

    result = CliRunner().invoke(cmd, input=answer)
    assert f"result={expected}" in result.output
    assert "IP address is\n  never stored" in result.output or "IP address is never stored" in result.output
    assert load_config(path).consent_given is expected


def test_consent_text_mentions_the_risks():
    text = " ".join(consent.CONSENT_TEXT.split())
    for needle in ("network operator", "anyone else able to watch", "can be dangerous",
                   "stored locally", "IP address is never stored"):
        assert needle in text


def test_consent_survives_unwritable_config(tmp_path, capsys):
    path = tmp_path / "file-not-dir" / "c.toml"
    (tmp_path / "file-not-dir").write_text("")  # parent is a file: cannot write
    assert cli_consent.ensure_consent(load_config(tmp_path / "missing.toml").replace(), assume_yes=True, interactive=False)
    config = cfg.Config(load_config().as_dict(), {}, path)
    assert cli_consent.ensure_consent(config, assume_yes=True, interactive=False) is True
    assert "consent not remembered" in capsys.readouterr().err


def test_consent_notice_names_the_config_file_and_the_default_lists_categories(tmp_path):
    # Issue 10, item 7: "in the config file" did not say where it is, and the
    # notice called the default list safer while it held the high-risk sites.
    path = tmp_path / "c.toml"
    text = " ".join(consent.notice(path, {"NEWS": "News Media", "CTRL": "Control content"}, {"LGBT": "LGBT"}).split())
    assert f"set consent_given = false in the config file: {path}" in text
    assert "holds only these categories: News Media (NEWS), Control content (CTRL)." in text
    assert "--list high-risk" in text and "LGBT." in text
    lines = consent.essentials(path, {"NEWS": "News Media"}, {"LGBT": "LGBT", "ANON": "x"})
    assert 3 <= len(lines) <= 10 and all(len(line) <= 80 for line in lines)
    flat = " ".join(" ".join(lines).split())
    assert "NEWS" in flat and "(LGBT, ANON) are in --list high-risk" in flat and str(path) in flat


def test_non_utf8_config_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('probe_cc = "\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "UTF-8" in message and "\n" not in message
    with pytest.raises(ConfigError, match="latin1.toml"):
        save_setting("concurrency", 3, path=path)  # never overwrites a file it could not read


# ---------------------------------------------------------------- helper settings (services/helper/config.py)


@pytest.mark.parametrize("key, value, needle", [
    ("max_inflight", "lots", "whole number"),
    ("max_inflight", 0, "at least 1"),
    ("max_inflight", True, "whole number"),
    ("rate_per_minute", -1, "at least 0"),
    ("request_timeout", -1, "above 0"),
    ("request_timeout", "30", "seconds"),
    ("request_timeout", float("nan"), "above 0"),
    ("max_response_body", 1.5, "whole number"),
    ("max_redirects", "ten", "whole number"),
    ("trust_forwarded_for", "yes", "true or false"),
    ("listen", "127.0.0.1:99999", "HOST:PORT"),
    ("listen", 8080, "string"),
    ("allow", ["10.0.0.0/33"], "CIDR"),
    ("allow", [1], "CIDR"),
    ("resolver", "dns.example", "IP address"),
    ("doh_url", "http://dns.example/dns-query", "https"),
    ("ca_file", "/nonexistent/ca.pem", "no such file"),
    ("asn_db", "/nonexistent/geo", "no such directory"),
])
def test_helper_config_values_of_the_wrong_type_are_refused_at_start(key, value, needle):
    from core.errors import VantageError
    from services.helper.config import HelperConfig, HelperConfigError

    with pytest.raises(HelperConfigError) as info:
        HelperConfig.from_mapping({"listen": "127.0.0.1:0", key: value})
    message = str(info.value)
    assert info.value.key == key and message.startswith(f"{key} = ") and needle in message and "\n" not in message
    assert isinstance(info.value, VantageError) and isinstance(info.value, ValueError)


def test_helper_config_checks_every_key_and_keeps_good_values(tmp_path):
    from services.helper.config import _CHECKS, HelperConfig

    assert set(_CHECKS) == set(HelperConfig.KEYS)
    config = HelperConfig.from_mapping({
        "listen": "[::1]:0", "allow": "198.18.0.0/15", "max_inflight": 7, "rate_per_minute": 0,
        "resolver": "192.0.2.53:5353", "doh_url": "https://dns.example/dns-query", "asn_db": str(tmp_path),
        "trust_forwarded_for": True, "request_timeout": 2, "max_redirects": 0, "ca_file": "",
    })
    assert config.allow == ["198.18.0.0/15"] and config.request_timeout == 2.0 and config.ca_file is None
    assert HelperConfig.from_mapping({}) == HelperConfig()


@pytest.mark.parametrize("body, needle", [
    ('max_inflight = "lots"\n', "max_inflight = 'lots'"),
    ("request_timeout = -1\n", "request_timeout = -1"),
    ('ca_file = "/nonexistent/lab-ca.pem"\n', "/nonexistent/lab-ca.pem"),
    ('listen = "127.0.0.1:99999"\n', "127.0.0.1:99999"),
    (b'listen = "\xff"\n', "not UTF-8"),
])
def test_helper_serve_refuses_bad_config_in_one_line_exit_2(tmp_path, body, needle):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "helper.toml"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "cli.main", "helper", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=root)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_helper_serve_listen_out_of_range_is_one_line_exit_2():
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "cli.main", "helper", "serve", "--listen", "127.0.0.1:99999"],
                          capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "127.0.0.1:99999" in lines[0] and "Traceback" not in proc.stderr


def test_the_notice_says_what_uploading_sends_and_that_it_needs_consent():
    # Issue 13: upload after each run is off until the volunteer agrees in the consent notice.
    text = " ".join(consent.CONSENT_TEXT.split())
    for needle in ("Uploading is off unless you agree", "upload_after_run = true", "configured collector",
                   "the sites tested", "your country and network (ASN)", "Your IP address is never sent",
                   "consent_upload = true", "`vantage upload` run by hand always sends"):
        assert needle in text, needle
    assert "collector_url = https://c.example" in " ".join(consent.upload_paragraph("https://c.example").split())
    assert cfg.SETTINGS_BY_NAME["consent_upload"].default is False
    assert load_config().as_dict()["consent_upload"] is False


@pytest.mark.parametrize("answers,uploads", [(["y", "y"], True), (["y", "n"], False)])
def test_upload_consent_is_asked_when_upload_after_run_is_set(tmp_path, answers, uploads):
    path = tmp_path / "c.toml"
    path.write_text("upload_after_run = true\ncollector_url = \"https://c.example\"\n")
    asked = []

    def ask(text, question):
        asked.append((text, question))
        return answers[len(asked) - 1] == "y"

    assert consent.ensure_consent(load_config(path), assume_yes=False, interactive=True, ask=ask) is True
    assert [q for _, q in asked] == [consent.CONSENT_QUESTION, consent.UPLOAD_QUESTION]
    assert "collector_url = https://c.example" in " ".join(asked[1][0].split())
    assert load_config(path).as_dict()["consent_upload"] is uploads
    assert consent.upload_consented(load_config(path)) is uploads


def test_yes_never_agrees_to_uploading_and_nothing_is_asked_without_upload_after_run(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("upload_after_run = true\n")
    assert consent.ensure_consent(load_config(path), assume_yes=True, interactive=False) is True
    assert load_config(path).consent_given is True and load_config(path).as_dict()["consent_upload"] is False
    # consent given, not at a terminal: not asked, not recorded
    assert consent.ensure_consent(load_config(path), assume_yes=False, interactive=False,
                                  ask=lambda *a: pytest.fail("asked")) is True
    assert load_config(path).as_dict()["consent_upload"] is False
    other = tmp_path / "d.toml"
    other.write_text("consent_given = true\n")
    assert consent.ensure_consent(load_config(other), assume_yes=False, interactive=True,
                                  ask=lambda *a: pytest.fail("asked")) is True
