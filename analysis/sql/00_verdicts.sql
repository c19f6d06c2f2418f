-- 00_verdicts: the table the analysis owns (one verdict per measurement).
-- Created, idempotently, whenever the analysis opens a database; the probe's
-- schema (probes/schema.sql) holds only what the probe writes. Databases made
-- before the split already have this exact table.
-- Columns: status is ok | blocked | throttled | down | server_side |
--   inconclusive; layer/method name the interference (dns.nxdomain, tcp.reset,
--   ...); evidence is JSON {rule, compared, fingerprint_set} (docs/analysis.md).
CREATE TABLE IF NOT EXISTS verdicts (
    measurement_id VARCHAR PRIMARY KEY,
    input VARCHAR,
    status VARCHAR,              -- ok | blocked | throttled | down | server_side | inconclusive
    layer VARCHAR,
    method VARCHAR,
    confidence DOUBLE,
    confirmed BOOLEAN,
    evidence JSON,
    analysed_at TIMESTAMP
);
