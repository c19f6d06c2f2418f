"""A fetch that times out mid-body: still flowing (slow: a question for the
throttling test) versus frozen (a censor stalling the flow: blocked)."""

from __future__ import annotations

from analysis_fixtures import control, database, http, q, tcp, tls, verdict, web
from probes import records as R

URL = "https://big.example/"
IP = "198.18.0.10"
PAGE = "<html><title>Big</title>" + "x" * 5000


def _timed_out_fetch(last_byte_at: float, failed_at: float = 15.0) -> dict:
    hop = http(URL, IP, status=200, body=PAGE[:2000], failure="generic_timeout_error")
    hop["t"] = failed_at
    events = [R.network_event(operation="bytes_received", t=t, transaction_id=hop["transaction_id"], num_bytes=1400)
              for t in [0.2 + i * (last_byte_at - 0.2) / 20 for i in range(21)]]
    record = web(URL, queries=[q("big.example", IP)], tcps=[tcp(IP)], tlss=[tls(IP, "big.example")], requests=[hop],
                 ctl=control(addrs=(IP,), body=PAGE, title="Big", host="big.example"))
    record["test_keys"]["network_events"] = events
    return record


def test_timeout_while_bytes_still_arrive_is_not_called_blocking():
    record = _timed_out_fetch(last_byte_at=14.8)
    v = verdict(database([record]), record)
    assert v["status"] == "inconclusive" and v["evidence"]["rule"] == "slow_transfer"


def test_timeout_after_the_flow_froze_is_http_timeout():
    record = _timed_out_fetch(last_byte_at=1.0)
    v = verdict(database([record]), record)
    assert (v["status"], v["layer"], v["method"]) == ("blocked", "http", "http.timeout")
