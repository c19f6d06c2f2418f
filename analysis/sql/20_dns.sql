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
--   * Bogon = the special-purpose ranges of core.net (SPECIAL_V4/SPECIAL_V6,
--     RFC 6890 and successors) minus the networks the caller declares public
--     (the lab's 198.18.0.0/15). Dotted IPv4 is classified here against
--     _a_bogon4/_a_public4 (filled from core.net); other spellings by the
--     engine with core.net.Policy, which reads IPv4-mapped and NAT64/6to4
--     addresses as the IPv4 they carry.
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
), v4n AS (
    SELECT ip, list_reduce(list_transform(string_split(ip, '.'), lambda x: x::BIGINT), lambda a, b: a * 256 + b) AS n
    FROM ips
    WHERE regexp_full_match(ip, '[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}')
)
SELECT v4n.ip,
       EXISTS (SELECT 1 FROM _a_bogon4 b WHERE v4n.n BETWEEN b.lo AND b.hi)
       AND NOT EXISTS (SELECT 1 FROM _a_public4 p WHERE v4n.n BETWEEN p.lo AND p.hi) AS bogon
FROM v4n
UNION ALL
-- IPv6, IPv4-mapped and any other spelling: left NULL here, classified by the
-- engine with core.net (embedded IPv4 included) right after this file.
SELECT ip, NULL::BOOLEAN AS bogon
FROM ips
WHERE ip NOT IN (SELECT ip FROM v4n);
