-- 21_dns_signals: per-answer and per-measurement DNS signals (see 20_dns for
-- the terms). Runs after the engine has classified the addresses 20_dns left
-- open in _a_ipclass (IPv6 and other non-dotted spellings).
-- Grain: _a_valid (measurement, vouched address), _a_ctl_ip (measurement,
--   control-resolved address), _a_ipobs (measurement, address the probe used),
--   _a_ans (one per probe system/UDP first-response address), _a_inject (one
--   per measurement with differing late responses), _a_dns_m (one per
--   measurement).
-- Caveats: see 20_dns. An answer is consistent with the control (vouched)
--   when it is the same address, in the same autonomous system or
--   organisation as one the control resolved, or serves a certificate valid
--   for the host to the probe (the strongest peers' rule: OONI's, Censored
--   Planet's).
-- Probe answers in the autonomous system (or organisation) of an address the
-- control resolved: a CDN's or geo-DNS's other prefix, not a censor's server
-- (_a_asn: the helper's ip_info ASNs and the ASN database's, by the engine).
CREATE OR REPLACE TEMP TABLE _a_same_as AS
SELECT DISTINCT p.measurement_id, p.ip
FROM (SELECT DISTINCT d.measurement_id, d.ip, a.asn, a.org FROM _a_dns d JOIN _a_asn a ON a.ip = d.ip
      WHERE d.side = 'probe') p
JOIN (SELECT DISTINCT d.measurement_id, a.asn, a.org FROM _a_dns d JOIN _a_asn a ON a.ip = d.ip
      WHERE d.side = 'control') c
  ON c.measurement_id = p.measurement_id AND (c.asn = p.asn OR (c.org IS NOT NULL AND c.org = p.org));

CREATE OR REPLACE TEMP TABLE _a_valid AS
SELECT measurement_id, ip FROM _a_dns
WHERE ip IS NOT NULL AND (side = 'control' OR (engine = 'doh' AND response_index = 0))
UNION
SELECT t.measurement_id, lower(t.ip) FROM tls_handshakes t JOIN _a_m m USING (measurement_id)
WHERE t.side = 'probe' AND t.success AND coalesce(t.cert_valid, true)
  AND (t.server_name IS NULL OR lower(rtrim(t.server_name, '.')) IN (m.host, m.host_u))
UNION
SELECT measurement_id, ip FROM _a_same_as;

CREATE OR REPLACE TEMP TABLE _a_ctl_ip AS
SELECT DISTINCT measurement_id, ip FROM _a_dns WHERE side = 'control' AND ip IS NOT NULL;

-- What happened downstream on each address the probe used. Per step (TCP,
-- TLS, HTTP) a success on another attempt clears the step's failures: the
-- probe retries what failed the censor's way (column attempt).
CREATE OR REPLACE TEMP TABLE _a_ipobs AS
SELECT measurement_id, ip, bool_or(failed) AS failed
FROM (
    SELECT measurement_id, ip, step, bool_or(failed) AND NOT bool_or(ok) AS failed
    FROM (
        -- An unroutable address (an IPv4-only probe given an AAAA answer) is the
        -- probe's own routing, not something done to that address.
        SELECT measurement_id, lower(ip) AS ip, 1 AS step,
               NOT success AND coalesce(failure, '') NOT IN {{UNROUTABLE}} AS failed, success AS ok FROM tcp_connects
        WHERE side = 'probe' {{AND_IN_SCOPE}}
        UNION ALL
        SELECT measurement_id, lower(ip), 2, NOT success, success FROM tls_handshakes
        WHERE side = 'probe' {{AND_IN_SCOPE}}
        UNION ALL
        SELECT measurement_id,
               _a_endpoint_ip(address), 3,
               failure IS NOT NULL, failure IS NULL FROM http_transactions
        WHERE side = 'probe' AND address IS NOT NULL {{AND_IN_SCOPE}}
    )
    GROUP BY ALL
)
GROUP BY ALL;

CREATE OR REPLACE TEMP TABLE _a_ans AS
SELECT d.measurement_id, d.engine, d.input_host, d.ip,
       coalesce(c.bogon, false) AS bogon,
       ci.ip IS NOT NULL AS in_control,
       v.ip IS NOT NULL AS vouched,
       coalesce(o.failed, false) AS downstream_failed,
       -- a fingerprinted address the control got too (127.0.0.1 for a name
       -- that really points there) is the site's, not a censor's
       CASE WHEN ci.ip IS NULL THEN f.name END AS fp_name
FROM _a_dns d
LEFT JOIN _a_ipclass c ON c.ip = d.ip
LEFT JOIN _a_ctl_ip ci ON ci.measurement_id = d.measurement_id AND ci.ip = d.ip
LEFT JOIN _a_valid v ON v.measurement_id = d.measurement_id AND v.ip = d.ip
LEFT JOIN _a_ipobs o ON o.measurement_id = d.measurement_id AND o.ip = d.ip
LEFT JOIN (SELECT ip, min(source || ':' || name) AS name FROM fp_dns GROUP BY ip) f ON f.ip = d.ip
WHERE d.side = 'probe' AND d.engine IN ('system', 'udp') AND d.response_index = 0 AND d.ip IS NOT NULL;

-- Injection: the same query (transaction, type) got a later response whose
-- answers differ from the first one's. Genuine resolvers answer once.
CREATE OR REPLACE TEMP TABLE _a_inject AS
WITH late AS (  -- few measurements have late responses: find them first
    SELECT DISTINCT measurement_id, transaction_id FROM _a_dns
    WHERE side = 'probe' AND response_index >= 1 AND ip IS NOT NULL
), sets AS (
    SELECT d.measurement_id, d.engine, d.transaction_id, d.query_type, d.hostname, d.response_index,
           string_agg(DISTINCT d.ip, ',' ORDER BY d.ip) AS answers
    FROM _a_dns d
    JOIN late USING (measurement_id, transaction_id)
    WHERE d.side = 'probe' AND d.engine IN ('system', 'udp') AND d.ip IS NOT NULL
    GROUP BY ALL
)
SELECT f.measurement_id, min(f.answers) AS first_answers, min(l.answers) AS late_answers
FROM sets f
JOIN sets l ON l.measurement_id = f.measurement_id AND l.engine = f.engine AND l.transaction_id = f.transaction_id
           AND l.query_type IS NOT DISTINCT FROM f.query_type AND l.hostname IS NOT DISTINCT FROM f.hostname
           AND f.response_index = 0 AND l.response_index >= 1 AND l.answers <> f.answers
GROUP BY f.measurement_id;

CREATE OR REPLACE TEMP TABLE _a_dns_m AS
WITH q AS (
    SELECT measurement_id,
           bool_or(input_host AND failure IN ('dns_nxdomain_error', 'android_dns_cache_no_data')) AS p_nx_input,
           bool_or(input_host AND failure = 'dns_no_answer' AND query_type IN ('A', 'ANY')) AS p_noanswer_input,
           bool_or(NOT input_host AND failure IN ('dns_nxdomain_error', 'android_dns_cache_no_data')) AS p_nx_other,
           any_value(hostname) FILTER (WHERE NOT input_host AND failure IN ('dns_nxdomain_error', 'android_dns_cache_no_data')) AS p_nx_other_host,
           bool_or(input_host AND failure IN ('generic_timeout_error', 'dns_temporary_failure', 'dns_servfail_error')) AS p_timeout_input,
           any_value(failure) FILTER (WHERE input_host AND failure IS NOT NULL) AS p_input_failure,
           count(ip) FILTER (WHERE input_host) AS p_addrs_input
    FROM _a_dns
    WHERE side = 'probe' AND engine IN ('system', 'udp') AND response_index = 0
    GROUP BY measurement_id
), any_probe AS (
    SELECT measurement_id,
           bool_or(ip IS NOT NULL) AS p_any_answer,
           bool_or(failure IN {{UNROUTABLE}}) AS p_dns_unreach
    FROM _a_dns WHERE side = 'probe'
    GROUP BY measurement_id
), a AS (
    SELECT measurement_id,
           min(ip) FILTER (WHERE bogon AND NOT in_control AND input_host) AS bogon_input,
           min(ip) FILTER (WHERE bogon AND NOT in_control AND NOT input_host) AS bogon_other,
           min(ip) FILTER (WHERE input_host AND NOT vouched AND downstream_failed) AS unvouched_failed,
           min(ip) FILTER (WHERE input_host AND NOT vouched) AS unvouched,
           -- the same unvouched answer from the system resolver and from a
           -- direct UDP query: a forger on the path, not one lying resolver
           bool_or(engine = 'udp' AND input_host AND NOT vouched AND NOT bogon) AS udp_unvouched,
           bool_or(engine = 'system' AND input_host AND NOT vouched AND NOT bogon) AS sys_unvouched,
           bool_or(engine = 'system' AND input_host AND vouched) AS sys_any_vouched,
           min(fp_name) AS dns_fp,
           min(ip) FILTER (WHERE fp_name IS NOT NULL) AS dns_fp_ip,
           bool_or(fp_name IS NOT NULL AND bogon) AS dns_fp_bogon,
           list(DISTINCT ip ORDER BY ip) FILTER (WHERE input_host) AS p_answers
    FROM _a_ans
    GROUP BY measurement_id
)
SELECT m.measurement_id,
       coalesce(q.p_nx_input, false) AS p_nx_input,
       coalesce(q.p_noanswer_input, false) AS p_noanswer_input,
       coalesce(q.p_nx_other, false) AS p_nx_other, q.p_nx_other_host,
       coalesce(q.p_timeout_input, false) AS p_timeout_input, q.p_input_failure,
       coalesce(q.p_addrs_input, 0) AS p_addrs_input,
       coalesce(any_probe.p_any_answer, false) AS p_any_answer,
       coalesce(any_probe.p_dns_unreach, false) AS p_dns_unreach,
       a.bogon_input, a.bogon_other, a.unvouched_failed, a.unvouched,
       coalesce(a.udp_unvouched AND a.sys_unvouched, false) AS two_path_forgery,
       coalesce(a.sys_any_vouched, false) AS sys_any_vouched,
       a.dns_fp, a.dns_fp_ip, coalesce(a.dns_fp_bogon, false) AS dns_fp_bogon, a.p_answers,
       i.first_answers AS inj_first, i.late_answers AS inj_late
FROM _a_m m
LEFT JOIN q USING (measurement_id)
LEFT JOIN any_probe USING (measurement_id)
LEFT JOIN a USING (measurement_id)
LEFT JOIN _a_inject i USING (measurement_id);
