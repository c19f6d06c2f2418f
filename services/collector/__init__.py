"""The central collector: volunteers' measurements into one Vantage database.

Split by job: ``protocol`` (bk-003 shapes, validation, ids, scrubbing),
``spool`` (the fsync'd append-only spool and the report registry),
``ingest`` (spool segments into DuckDB through probes.store, idempotently),
``limits`` (body cap, in-flight cap, rate limit, metrics), ``app`` (the
aiohttp apps and the life cycle). docs/collector.md has the guarantees.
"""

from __future__ import annotations

from .app import Collector, CollectorConfig, CollectorConfigError, serve_forever

__all__ = ["Collector", "CollectorConfig", "CollectorConfigError", "serve_forever"]
