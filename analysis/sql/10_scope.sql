-- 10_scope: the measurements being analysed and their control summary.
-- Grain: _a_m has one row per measurement in _a_scope (filled by the engine:
--   every measurement, or only those without a verdict).
-- Columns: measurement_id, input, host (lower-case ASCII host of the input; IDNA
--   hosts come punycoded from _a_idna because DuckDB has no IDNA function;
--   host_u keeps the Unicode spelling, since resolvers' records may use either),
--   scheme, control_failure (NULL = a control answered), probe_network_ok,
--   run_id, start_time. _a_online_nearby: measurements flagged offline whose
--   run was demonstrably online around the same time.
-- _a_ctl: one row per measurement that has a control, summarising what the
--   helper saw: did its DNS resolve, did it connect, did its TLS validate, did
--   its HTTP fetch succeed, and the page it got (status, title, length, server).
-- Caveats: OONI test helpers name failures differently (dns_name_error,
--   connection_refused_error, unknown_error); only "failed or not" is used here,
--   except the NXDOMAIN spelling, which both vocabularies are matched for.
-- Macros for every later stage (core.net's endpoint text, written once here):
--   _a_endpoint(ip, port) -> '1.2.3.4:443' or '[2001:db8::1]:443';
--   _a_endpoint_ip(address) -> the lower-case address of such a text (empty
--   when it is not one).
CREATE OR REPLACE TEMP MACRO _a_endpoint(ip, port) AS
    CASE WHEN contains(ip, ':') THEN '[' || ip || ']' ELSE ip END || ':' || port;
CREATE OR REPLACE TEMP MACRO _a_endpoint_ip(address) AS
    lower(CASE WHEN address LIKE '[%' THEN regexp_extract(address, '^\[([^\]]*)\]', 1)
               ELSE regexp_extract(address, '^(.*):[0-9]+$', 1) END);

CREATE OR REPLACE TEMP TABLE _a_m AS
SELECT m.measurement_id, m.input,
       coalesce(i.ascii, lower(rtrim(m.domain, '.'))) AS host,
       lower(rtrim(m.domain, '.')) AS host_u,
       lower(m.scheme) AS scheme,
       m.control_failure,
       m.probe_network_ok,
       m.run_id,
       m.start_time
FROM measurements m
JOIN _a_scope s USING (measurement_id)
LEFT JOIN _a_idna i ON i.domain = m.domain;

-- The probe's own "network ok" flag is judged from one measurement: a domain
-- whose DNS is dropped looks exactly like a dead uplink (getaddrinfo says
-- EAI_AGAIN either way). Another measurement of the same run, within five
-- minutes, that reached the network settles it: the probe was online.
CREATE OR REPLACE TEMP TABLE _a_online_nearby AS
SELECT DISTINCT o.measurement_id
FROM _a_m o
JOIN measurements n ON n.run_id = o.run_id AND n.probe_network_ok AND n.measurement_id <> o.measurement_id
WHERE o.probe_network_ok = false
  AND abs(epoch(n.start_time) - epoch(o.start_time)) <= 300;

-- Each side's summary is its own statement: joined in one plan, the four
-- aggregates' hash tables were in memory at once, which at 3M measurements
-- needed 2.6 GB where these need 1.6 GB (they spill one at a time).
CREATE OR REPLACE TEMP TABLE _a_ctl_dns AS
SELECT measurement_id,
       count(answer) FILTER (WHERE engine = 'th' AND answer_type IN ('A', 'AAAA')) AS c_addrs,
       count(answer) FILTER (WHERE engine = 'th' AND answer_type = 'A') AS c_addrs4,
       bool_or(engine = 'th' AND failure IN ('dns_name_error', 'dns_nxdomain_error')) AS c_nx,
       any_value(failure) FILTER (WHERE engine = 'th') AS c_dns_failure
FROM dns_answers
WHERE side = 'control' {{AND_IN_SCOPE}}
GROUP BY measurement_id;

CREATE OR REPLACE TEMP TABLE _a_ctl_tcp AS
SELECT measurement_id, bool_or(success) AS c_tcp_ok, count(*) AS c_tcp_n
FROM tcp_connects
WHERE side = 'control' {{AND_IN_SCOPE}}
GROUP BY measurement_id;

CREATE OR REPLACE TEMP TABLE _a_ctl_tls AS
SELECT measurement_id,
       bool_or(success AND coalesce(cert_valid, true)) AS c_tls_ok,
       bool_or(failure LIKE 'ssl\_%' ESCAPE '\' OR cert_valid = false) AS c_tls_certfail,
       any_value(failure) FILTER (WHERE failure LIKE 'ssl\_%' ESCAPE '\') AS c_tls_certfail_what
FROM tls_handshakes
WHERE side = 'control' {{AND_IN_SCOPE}}
GROUP BY measurement_id;

CREATE OR REPLACE TEMP TABLE _a_ctl_http AS
SELECT measurement_id,
       any_value(failure) AS c_http_failure,
       any_value(status_code) AS c_status,
       any_value(title) AS c_title,
       any_value(body_length) AS c_len,
       any_value(body_truncated) AS c_trunc,
       any_value(body_sha256) AS c_sha,
       any_value(coalesce(json_extract_string(headers, '$.Server'), json_extract_string(headers, '$.server'))) AS c_server
FROM http_transactions
WHERE side = 'control' {{AND_IN_SCOPE}}
GROUP BY measurement_id;

CREATE OR REPLACE TEMP TABLE _a_ctl AS
SELECT m.measurement_id,
       coalesce(dns.c_addrs, 0) AS c_addrs,
       coalesce(dns.c_addrs4, 0) AS c_addrs4,
       coalesce(dns.c_nx, false) AS c_nx,
       dns.c_dns_failure,
       coalesce(tcp.c_tcp_ok, false) AS c_tcp_ok,
       coalesce(tcp.c_tcp_n, 0) AS c_tcp_n,
       coalesce(tls.c_tls_ok, false) AS c_tls_ok,
       coalesce(tls.c_tls_certfail, false) AS c_tls_certfail,
       tls.c_tls_certfail_what,
       http.measurement_id IS NOT NULL AND http.c_http_failure IS NULL AND http.c_status IS NOT NULL AS c_http_ok,
       coalesce(http.c_http_failure, CASE WHEN http.measurement_id IS NULL THEN 'no_http_control' END) AS c_http_failure,
       http.c_status, http.c_title, http.c_len, http.c_trunc, http.c_sha, http.c_server
FROM _a_m m
LEFT JOIN _a_ctl_dns dns USING (measurement_id)
LEFT JOIN _a_ctl_tcp tcp USING (measurement_id)
LEFT JOIN _a_ctl_tls tls USING (measurement_id)
LEFT JOIN _a_ctl_http http USING (measurement_id)
WHERE m.control_failure IS NULL;
