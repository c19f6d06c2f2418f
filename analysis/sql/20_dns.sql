-- 20_dns: DNS observations, address classes and per-measurement DNS signals.
-- Grain:
--   _a_dns      one row per DNS answer (or answerless response) of the scope;
--               engine getaddrinfo (OONI) is folded into system.
--   _a_ipclass  one row per distinct address seen in DNS: bogon or not.
--   _a_valid    (measurement_id, ip) pairs whose legitimacy something vouches
--               for: the control resolved it, the probe's DoH returned it, or the
--               probe's own TLS handshake on it validated for the host. (The
--               control's handshake on a probe-supplied address does not count:
--               a transparent proxy the censor points DNS at passes it.)
--   _a_ans      one row per address the probe's system/UDP resolvers returned
--               in a first response, with its classes and downstream fate.
--   _a_dns_m    one row per measurement with DNS signals.
-- Caveats:
--   * Bogon = special-purpose ranges (RFC 6890) minus the networks the caller
--     declares public (the lab's 198.18.0.0/15). IPv6 bogons are recognised by
--     prefix (loopback, link-local, ULA, documentation, v4-mapped bogons).
--   * A different answer from the control is not an anomaly by itself (CDNs,
--     geo-DNS): it needs no voucher AND a failure downstream (or the control
--     saying the name does not exist) to count.
--   * Only answers for the input's host are compared with the control: the
--     helper resolves that host only, not the hosts of redirects.
CREATE OR REPLACE TEMP TABLE _a_dns AS
SELECT d.measurement_id, d.side,
       CASE WHEN d.engine = 'getaddrinfo' THEN 'system' ELSE d.engine END AS engine,
       d.transaction_id, coalesce(d.response_index, 0) AS response_index,
       CASE WHEN d.side = 'control' AND d.engine = 'th' THEN m.host ELSE lower(rtrim(d.hostname, '.')) END AS hostname,
       d.query_type, d.failure,
       CASE WHEN d.answer_type IN ('A', 'AAAA') THEN lower(d.answer) END AS ip,
       CASE WHEN d.side = 'control' AND d.engine = 'th' THEN true
            ELSE lower(rtrim(d.hostname, '.')) IN (m.host, m.host_u) END AS input_host
FROM dns_answers d
JOIN _a_m m USING (measurement_id);

CREATE OR REPLACE TEMP TABLE _a_ipclass AS
WITH ips AS (
    SELECT DISTINCT ip FROM _a_dns WHERE ip IS NOT NULL
), v4 AS (
    SELECT ip, CASE WHEN ip LIKE '::ffff:%' THEN substr(ip, 8) ELSE ip END AS v4
    FROM ips
    WHERE regexp_full_match(ip, '(::ffff:)?[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}')
), v4n AS (
    SELECT ip, list_reduce(list_transform(string_split(v4, '.'), lambda x: x::BIGINT), lambda a, b: a * 256 + b) AS n
    FROM v4
), v4c AS (
    SELECT v4n.ip,
           EXISTS (SELECT 1 FROM _a_bogon4 b WHERE v4n.n BETWEEN b.lo AND b.hi)
           AND NOT EXISTS (SELECT 1 FROM _a_public4 p WHERE v4n.n BETWEEN p.lo AND p.hi) AS bogon
    FROM v4n
)
SELECT ip, bogon FROM v4c
UNION ALL
SELECT ip,
       ip IN ('::', '::1')
       OR regexp_matches(ip, '^(fe[89ab][0-9a-f]:|f[cd][0-9a-f]{2}:|2001:db8:|2001:0db8:|100::|ff[0-9a-f]{2}:)') AS bogon
FROM ips
WHERE ip NOT IN (SELECT ip FROM v4);
