"""Runner mechanics: concurrency, one measurement per domain at a time,
deadlines that keep partial results, resume, and the privacy scrub."""

from __future__ import annotations

import asyncio
import time

from probes import store
from probes.context import ProbeContext
from probes.runner import (Location, Experiment, experiments, remaining_inputs, rescue_path, resume, run_inputs,
                           run_options, scrub, start_run)
from probes.timeouts import Timeouts


def _spec(measure):
    return Experiment("fake_test", "0", measure, lambda: {"steps": []}, lambda keys: "done" if keys["steps"] else "empty")


def _ctx(measurement=5.0):
    return ProbeContext(timeouts=Timeouts(measurement=measurement))


async def test_one_measurement_per_domain_and_global_concurrency(tmp_path):
    active: dict[str, int] = {}
    peak_total = 0
    peak_domain = 0

    async def measure(url, ctx, keys, clock):
        nonlocal peak_total, peak_domain
        host = url.split("/")[2]
        active[host] = active.get(host, 0) + 1
        peak_domain = max(peak_domain, active[host])
        peak_total = max(peak_total, sum(active.values()))
        await asyncio.sleep(0.02)
        keys["steps"].append(url)
        active[host] -= 1

    con = store.connect(tmp_path / "v.duckdb")
    sink = store.Sink(con)
    inputs = [(f"https://d{i % 5}.example/{i}", "NEWS") for i in range(40)]
    summary = await run_inputs(inputs, test=_spec(measure), ctx=_ctx(), sink=sink, run_id="R", location=Location(), concurrency=8)
    sink.close()
    assert summary.measured == 40 and summary.status == "finished"
    assert peak_domain == 1
    assert peak_total <= 5  # only 5 domains, so at most 5 at once despite 8 workers
    assert con.execute("SELECT count(*) FROM measurements WHERE run_id = 'R'").fetchone()[0] == 40


async def test_deadline_keeps_the_steps_that_finished(tmp_path):
    async def measure(url, ctx, keys, clock):
        keys["steps"].append("dns done")
        await asyncio.sleep(10)

    con = store.connect(tmp_path / "v.duckdb")
    sink = store.Sink(con)
    start = time.monotonic()
    await run_inputs([("https://slow.example/", None)], test=_spec(measure), ctx=_ctx(measurement=0.2), sink=sink, run_id="R", location=Location())
    sink.close()
    assert time.monotonic() - start < 2
    import json

    record = json.loads(con.execute("SELECT record FROM measurements").fetchone()[0])
    assert record["test_keys"]["steps"] == ["dns done"]
    assert record["test_keys"]["x_deadline_exceeded"] is True


async def test_interrupted_run_resumes_where_it_stopped(tmp_path):
    async def measure(url, ctx, keys, clock):
        await asyncio.sleep(0.05 if url.endswith("/0") else 5)
        keys["steps"].append(url)

    con = store.connect(tmp_path / "v.duckdb")
    spec = _spec(measure)
    inputs = [(f"https://d{i}.example/{i}", None) for i in range(3)]
    start_run(con, "R", spec, inputs, {}, Location())
    sink = store.Sink(con)
    task = asyncio.create_task(run_inputs(inputs, test=spec, ctx=_ctx(), sink=sink, run_id="R", location=Location(), concurrency=3))
    await asyncio.sleep(0.5)
    task.cancel()  # what Ctrl-C does
    try:
        await task
    except asyncio.CancelledError:
        pass
    sink.close()
    assert con.execute("SELECT count(*) FROM measurements").fetchone()[0] == 1
    assert [u for u, _ in remaining_inputs(con, "R")] == ["https://d1.example/1", "https://d2.example/2"]


def test_resume_reads_the_runs_test_options_and_remaining_inputs(tmp_path):
    con = store.connect(tmp_path / "v.duckdb")
    throttling = experiments("throttling")[0]
    inputs = [("https://a.example/", "NEWS"), ("https://b.example/", None)]
    start_run(con, "R", throttling, inputs, {"test": "all", "resolver": "192.0.2.53", "no_doh": True}, Location())
    resumed = resume(con, "R")
    assert resumed.test == "throttling"  # `all` started one run per test: this one is throttling
    assert resumed.options["resolver"] == "192.0.2.53"
    assert resumed.inputs == inputs
    assert resume(con, "NOPE") is None
    assert [s.name for s in experiments("all")] == ["web_connectivity", "throttling"]


def test_run_options_prefer_the_command_line_then_the_recorded_run():
    recorded = {"test": "web", "resolver": "192.0.2.53", "no_doh": True, "public_networks": ["198.18.0.0/15"]}
    options = run_options({"test": "web", "resolver": None, "doh_url": None, "no_doh": False, "public_networks": []}, recorded)
    assert options == {"test": "web", "resolver": "192.0.2.53", "doh_url": None, "no_doh": True,
                       "public_networks": ["198.18.0.0/15"]}
    fresh = run_options({"test": "web", "helpers": [], "no_doh": False, "public_networks": [], "resolver": "192.0.2.1"})
    assert fresh == {"test": "web", "helpers": None, "no_doh": False, "public_networks": [], "resolver": "192.0.2.1"}


def test_rescue_file_sits_beside_the_database():
    assert str(rescue_path("/data/v.duckdb", "R1")) == "/data/v.duckdb.rescue-R1.jsonl"
    assert rescue_path("/data/v.db", "R1") != rescue_path("/data/v.duckdb", "R1")


async def test_max_runtime_stops_starting_new_measurements(tmp_path):
    async def measure(url, ctx, keys, clock):
        await asyncio.sleep(0.1)
        keys["steps"].append(url)

    con = store.connect(tmp_path / "v.duckdb")
    sink = store.Sink(con)
    inputs = [(f"https://d.example/{i}", None) for i in range(100)]  # one domain: sequential
    summary = await run_inputs(inputs, test=_spec(measure), ctx=_ctx(), sink=sink, run_id="R", location=Location(), max_runtime=0.35)
    sink.close()
    assert summary.status == "timed_out"
    assert 2 <= summary.measured <= 6


def test_scrub_removes_the_probe_address_everywhere():
    record = {"test_keys": {"requests": [{"response": {"body": "your ip is 203.0.113.7", "headers": {"X-Ip": "203.0.113.7"}}}],
                            "failure": "unknown_failure: bind 203.0.113.7 failed"}}
    cleaned = scrub(record, "203.0.113.7")
    assert "203.0.113.7" not in str(cleaned)
    assert cleaned["test_keys"]["requests"][0]["response"]["body"] == "your ip is [scrubbed]"


def test_scrub_matches_whole_addresses_and_binary_bodies():
    import base64

    raw = b"\xff\xfe binary page for 203.0.113.7 \x00"
    record = {"test_keys": {"requests": [{"response": {"body": {"format": "base64", "data": base64.b64encode(raw).decode()}}}],
                            "queries": [{"answers": [{"ipv4": "203.0.113.70"}, {"ipv4": "1203.0.113.7"}]}]}}
    cleaned = scrub(record, ["203.0.113.7"])
    body = base64.b64decode(cleaned["test_keys"]["requests"][0]["response"]["body"]["data"])
    assert body == b"\xff\xfe binary page for [scrubbed] \x00"
    # Other addresses that merely contain the probe's are left alone.
    assert [a["ipv4"] for a in cleaned["test_keys"]["queries"][0]["answers"]] == ["203.0.113.70", "1203.0.113.7"]
