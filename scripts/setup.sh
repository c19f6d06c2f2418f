#!/usr/bin/env bash
# Set up Vantage on a fresh Debian/Ubuntu machine (or a Raspberry Pi OS):
# a virtualenv in .venv with Vantage installed. With --test, also the test
# dependencies and (as root) the system packages the lab needs.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$want_test" = 1 ] && [ "$(id -u)" = 0 ]; then
    need=()
    command -v iptables >/dev/null || need+=(iptables)
    command -v ip >/dev/null || need+=(iproute2)
    command -v tc >/dev/null || need+=(iproute2)
    [ -e /usr/include/libnetfilter_queue/libnetfilter_queue.h ] || need+=(libnetfilter-queue-dev)
    command -v chromium >/dev/null || need+=(chromium)  # tests/test_report_browser.py
    command -v systemd-analyze >/dev/null || need+=(systemd)  # tests/test_schedule.py: verify the units
    command -v java >/dev/null || need+=(openjdk-17-jre-headless)  # tests/test_spark.py: Spark runs on Java 17+
    if [ "${#need[@]}" -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        # Debian/Ubuntu ship venv separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$PY" -m venv .venv
        else
            echo "setup: '$PY -m venv' failed: install python3-venv (sudo apt-get install python3-venv) and retry" >&2
            exit 2
        fi
    fi
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "$want_test" = 1 ]; then
    .venv/bin/python -m pip install -q -e '.[test,lab,spark]'
else
    .venv/bin/python -m pip install -q -e .
fi
