-- 90_aggregates: analyst views over verdicts (persistent, recreated by every
-- `vantage analyze`; read them with the plain duckdb CLI).
-- Grain: agg_country_day one row per (probe_cc, day); agg_asn per (probe_cc,
--   probe_asn); agg_domain per domain; agg_category per category_code.
-- Columns: measurements, ok, anomaly (blocked + throttled: what a censor
--   does), blocked, throttled, confirmed (blocked with a fingerprint match),
--   server_side, down, inconclusive, anomaly_rate = anomaly / (ok + anomaly +
--   server_side), i.e. over the measurements that said something about
--   censorship (down and inconclusive ones did not).
-- Caveats: measurements without a verdict yet are counted in measurements but
--   in no status column. server_side is kept apart from anomaly on purpose: a
--   site refusing a network is not the network's censorship.
CREATE OR REPLACE VIEW agg_base AS
SELECT m.measurement_id, m.probe_cc, m.probe_asn, m.domain, coalesce(m.category_code, 'unknown') AS category_code,
       CAST(m.start_time AS DATE) AS day, v.status, coalesce(v.confirmed, false) AS confirmed
FROM measurements m LEFT JOIN verdicts v USING (measurement_id);

-- One GROUPING SETS pass holds the counts for every grain (the column list
-- is written once); each analyst view picks its grain out of it. agg_tally
-- holds only counts, so tallies of disjoint sets of measurements add up to
-- the tally of their union: the Spark engine (analysis/spark.py) tallies each
-- task's measurements and sums the tallies by grain and key before the same
-- agg_counts and views run over the sums. Every ratio is in agg_counts.
CREATE OR REPLACE VIEW agg_tally AS
SELECT CASE WHEN GROUPING(day) = 0 THEN 'country_day'
            WHEN GROUPING(probe_asn) = 0 THEN 'asn'
            WHEN GROUPING(domain) = 0 THEN 'domain'
            ELSE 'category' END AS grain,
       probe_cc, day, probe_asn, domain, category_code,
       count(*) AS measurements,
       count(*) FILTER (WHERE status = 'ok') AS ok,
       count(*) FILTER (WHERE status IN ('blocked', 'throttled')) AS anomaly,
       count(*) FILTER (WHERE status = 'blocked') AS blocked,
       count(*) FILTER (WHERE status = 'throttled') AS throttled,
       count(*) FILTER (WHERE status = 'blocked' AND confirmed) AS confirmed,
       count(*) FILTER (WHERE status = 'server_side') AS server_side,
       count(*) FILTER (WHERE status = 'down') AS down,
       count(*) FILTER (WHERE status = 'inconclusive') AS inconclusive,
       count(*) FILTER (WHERE status IN ('ok', 'blocked', 'throttled', 'server_side')) AS usable
FROM agg_base
GROUP BY GROUPING SETS ((probe_cc, day), (probe_cc, probe_asn), (domain), (category_code));

CREATE OR REPLACE VIEW agg_counts AS
SELECT * EXCLUDE (usable), round(anomaly / nullif(usable, 0), 4) AS anomaly_rate FROM agg_tally;

CREATE OR REPLACE VIEW agg_country_day AS
SELECT probe_cc, day, * EXCLUDE (grain, probe_cc, day, probe_asn, domain, category_code) FROM agg_counts WHERE grain = 'country_day';

CREATE OR REPLACE VIEW agg_asn AS
SELECT probe_cc, probe_asn, * EXCLUDE (grain, probe_cc, day, probe_asn, domain, category_code) FROM agg_counts WHERE grain = 'asn';

CREATE OR REPLACE VIEW agg_domain AS
SELECT domain, * EXCLUDE (grain, probe_cc, day, probe_asn, domain, category_code) FROM agg_counts WHERE grain = 'domain';

CREATE OR REPLACE VIEW agg_category AS
SELECT category_code, * EXCLUDE (grain, probe_cc, day, probe_asn, domain, category_code) FROM agg_counts WHERE grain = 'category';

-- ooni_comparison: OONI's own verdict beside ours, one row per measurement
-- that carries one (imported with `vantage import ooni`; docs/ooni.md).
-- ooni_says / we_say: blocked | ok | down | unknown. OONI's blocking false
-- with accessible false is its "website down"; a null blocking is OONI not
-- telling. Our blocked and throttled are `blocked`; server_side and
-- inconclusive (or no verdict yet) are `unknown`. ooni_layer maps OONI's kind
-- onto our layers (http-failure is TLS or HTTP, as ts-017 says).
-- Reads measurements through UNION ALL BY NAME so the view also binds on a
-- database the probe has not migrated to schema version 3 yet (columns NULL).
CREATE OR REPLACE VIEW ooni_comparison AS
SELECT m.measurement_id, m.input, m.probe_cc, m.probe_asn, CAST(m.start_time AS DATE) AS day,
       m.ooni_blocking, m.ooni_accessible,
       CASE WHEN m.ooni_blocking IN ('dns', 'tcp_ip', 'http-failure', 'http-diff', 'true') THEN 'blocked'
            WHEN m.ooni_blocking = 'false' AND m.ooni_accessible THEN 'ok'
            WHEN m.ooni_blocking = 'false' AND NOT m.ooni_accessible THEN 'down'
            ELSE 'unknown' END AS ooni_says,
       CASE m.ooni_blocking WHEN 'dns' THEN 'dns' WHEN 'tcp_ip' THEN 'tcp' WHEN 'http-failure' THEN 'tls|http'
                            WHEN 'http-diff' THEN 'http' END AS ooni_layer,
       v.status, v.layer, v.method,
       CASE WHEN v.status IN ('blocked', 'throttled') THEN 'blocked' WHEN v.status = 'ok' THEN 'ok'
            WHEN v.status = 'down' THEN 'down' ELSE 'unknown' END AS we_say
FROM (SELECT * FROM measurements
      UNION ALL BY NAME SELECT NULL::VARCHAR AS ooni_blocking, NULL::BOOLEAN AS ooni_accessible WHERE false) m
LEFT JOIN verdicts v USING (measurement_id)
WHERE m.ooni_blocking IS NOT NULL OR m.ooni_accessible IS NOT NULL;

-- ooni_disagreements: the rows of ooni_comparison where OONI and we both
-- said something and said different things. kind: ooni_blocked (OONI blocked,
-- we ok or down), we_blocked (we blocked, OONI ok or down), layer (both
-- blocked, at layers that do not match).
CREATE OR REPLACE VIEW ooni_disagreements AS
SELECT CASE WHEN ooni_says = 'blocked' AND we_say IN ('ok', 'down') THEN 'ooni_blocked'
            WHEN we_say = 'blocked' AND ooni_says IN ('ok', 'down') THEN 'we_blocked'
            ELSE 'layer' END AS kind,
       *
FROM ooni_comparison
WHERE (ooni_says = 'blocked' AND we_say IN ('ok', 'down'))
   OR (we_say = 'blocked' AND ooni_says IN ('ok', 'down'))
   OR (ooni_says = 'blocked' AND we_say = 'blocked' AND ooni_layer IS NOT NULL AND status = 'blocked'
       AND NOT list_contains(string_split(ooni_layer, '|'), coalesce(layer, '')));
