"""Facts and plumbing that every Vantage package may import.

``core`` imports nothing of Vantage's own: probes/, analysis/, services/,
test_lists/, lab/ and cli/ all stand on it (docs/internals.md lists the
allowed imports). Each module holds one kind of fact, written once:

- ``errors``: the one exception base that cli/ turns into a one-line message.
- ``paths``: where Vantage keeps files (XDG rules, VANTAGE_* overrides).
- ``download``: bounded downloads and atomic multi-file installs.
- ``failures``: the closed vocabulary of failure strings (OONI's).
- ``net``: endpoints, request headers, redirect codes, special-purpose ranges.
- ``schema_version``: the measurement database's current schema version.
"""
