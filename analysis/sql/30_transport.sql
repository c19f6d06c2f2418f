-- 30_transport: TCP connects and TLS handshakes, probe against control.
-- Grain: _a_tcp_m and _a_tls_m have one row per measurement with probe rows.
-- Columns: the first endpoint (ip:port) that failed in a censorship-shaped way
--   (refused / timed out / reset / timed out in TLS / an invalid certificate),
--   restricted to endpoints the control reached; p_tcp_ok, p_tls_certfail.
-- Caveats:
--   * "The control reached it" is endpoint-exact when the helper tried that
--     endpoint; when it did not (addresses of redirect targets, which the helper
--     never sees), a successful control fetch of the page stands in for it.
--   * Unroutable failures (network_unreachable, host_unreachable: the
--     core.failures.UNROUTABLE) are ignored: they are what a probe without IPv6 (or
--     offline) reports, not what a censor sends.
--   * ssl_failed_handshake (an alert instead of a ServerHello) counts as a
--     reset-style failure, with a lower confidence set in 60_verdicts.
--   * Retries (column attempt, probes/web_connectivity.py): the probe tries a
--     step that failed the censor's way again; one success on the endpoint
--     (a connect, a validated handshake) clears every failed attempt on it.
--   * One address family blocked (tcp_family_*): a dual-stack site whose
--     probe connects to one endpoint all failed the censor's way (refused /
--     timed out, never unroutable) while the control connected to that very
--     endpoint, the page perhaps fetched over the other family. It counts
--     only when that family demonstrably works for the probe: another probe
--     connect of the same family succeeded in the same run (or the same
--     measurement). A probe whose IPv6 never works (absent, broken, or
--     silently dropped everywhere) gives no such evidence.
CREATE OR REPLACE TEMP TABLE _a_tcp_m AS
WITH ep AS (  -- one row per probe endpoint, its attempts folded: one success clears it
    SELECT measurement_id, ip, port,
           bool_or(success) AS ok,
           bool_or(failure IN {{UNROUTABLE}}) AS unreach,
           bool_or(failure = 'connection_refused') AS refused,
           bool_or(failure = 'generic_timeout_error') AS timed_out
    FROM tcp_connects
    WHERE side = 'probe' {{AND_IN_SCOPE}}
    GROUP BY ALL
)
, pe AS (
    SELECT p.*, m.run_id, contains(p.ip, ':') AS v6,
           coalesce(c.success, (c.measurement_id IS NULL AND coalesce(k.c_http_ok, false))) AS reached,
           coalesce(c.success, false) AS ctl_connected  -- the helper itself connected to this endpoint
    FROM ep p
    JOIN _a_m m USING (measurement_id)
    LEFT JOIN _a_ctl k USING (measurement_id)
    LEFT JOIN (SELECT measurement_id, ip, port, bool_or(success) AS success FROM tcp_connects
               WHERE side = 'control' {{AND_IN_SCOPE}} GROUP BY ALL) c
           ON c.measurement_id = p.measurement_id AND c.ip = p.ip AND c.port = p.port
), cand AS (  -- endpoints that failed every attempt the censor's way while the control connected to them
    SELECT * FROM pe WHERE NOT ok AND NOT unreach AND (refused OR timed_out) AND ctl_connected
), fam_run AS (  -- the family works for the probe in this run: a probe connect of it succeeded
    -- (any success is another connect: a candidate endpoint never succeeded)
    SELECT DISTINCT n.run_id, contains(o.ip, ':') AS v6
    FROM tcp_connects o
    JOIN measurements n USING (measurement_id)
    WHERE o.side = 'probe' AND o.success AND n.run_id IN (SELECT run_id FROM cand)
), fam_m AS (  -- ... or in this measurement (records without a run)
    SELECT DISTINCT measurement_id, v6 FROM pe WHERE ok AND measurement_id IN (SELECT measurement_id FROM cand)
), fam AS (
    SELECT c.measurement_id,
           min(_a_endpoint(c.ip, c.port)) AS ep,
           arg_min(CASE WHEN c.v6 THEN 'IPv6' ELSE 'IPv4' END, _a_endpoint(c.ip, c.port)) AS family,
           arg_min(c.refused, _a_endpoint(c.ip, c.port)) AS refused
    FROM cand c
    LEFT JOIN fam_run r ON r.run_id = c.run_id AND r.v6 = c.v6
    LEFT JOIN fam_m f ON f.measurement_id = c.measurement_id AND f.v6 = c.v6
    WHERE r.run_id IS NOT NULL OR f.measurement_id IS NOT NULL
    GROUP BY c.measurement_id
)
SELECT p.measurement_id,
       bool_or(p.ok) AS p_tcp_ok,
       bool_or(p.unreach) AS p_tcp_unreach,
       min(_a_endpoint(p.ip, p.port)) FILTER (WHERE p.refused AND NOT p.ok AND reached) AS tcp_reset_ep,
       min(_a_endpoint(p.ip, p.port)) FILTER (WHERE p.timed_out AND NOT p.ok AND reached) AS tcp_timeout_ep,
       any_value(fam.ep) AS tcp_family_ep,
       any_value(fam.family) AS tcp_family,
       any_value(fam.refused) AS tcp_family_refused
FROM pe p
LEFT JOIN fam USING (measurement_id)
GROUP BY p.measurement_id;

CREATE OR REPLACE TEMP TABLE _a_tls_m AS
WITH ep AS (  -- one row per probe endpoint: its attempts, and whether one of them validated
    SELECT *, bool_or(success AND coalesce(cert_valid, true)) OVER (PARTITION BY measurement_id, ip, port) AS ep_ok
    FROM tls_handshakes
    WHERE side = 'probe' {{AND_IN_SCOPE}}
)
SELECT p.measurement_id,
       bool_or(p.failure LIKE 'ssl\_%' ESCAPE '\' OR p.cert_valid = false) AS p_tls_certfail,
       min(_a_endpoint(p.ip, p.port)) FILTER (WHERE p.failure IN ('connection_reset', 'eof_error') AND reached) AS tls_reset_ep,
       any_value(p.failure) FILTER (WHERE p.failure IN ('connection_reset', 'eof_error') AND reached) AS tls_reset_failure,
       min(_a_endpoint(p.ip, p.port)) FILTER (WHERE p.failure = 'ssl_failed_handshake' AND reached) AS tls_alert_ep,
       min(_a_endpoint(p.ip, p.port)) FILTER (WHERE p.failure = 'generic_timeout_error' AND reached) AS tls_timeout_ep,
       min(_a_endpoint(p.ip, p.port)) FILTER (WHERE (p.cert_valid = false OR p.failure IN ('ssl_unknown_authority', 'ssl_invalid_hostname', 'ssl_invalid_certificate')) AND reached) AS tls_mitm_ep,
       any_value(p.cert_issuer) FILTER (WHERE (p.cert_valid = false OR p.failure IN ('ssl_unknown_authority', 'ssl_invalid_hostname', 'ssl_invalid_certificate')) AND reached) AS tls_mitm_issuer,
       any_value(coalesce(p.cert_error, p.failure)) FILTER (WHERE (p.cert_valid = false OR p.failure IN ('ssl_unknown_authority', 'ssl_invalid_hostname', 'ssl_invalid_certificate')) AND reached) AS tls_mitm_error
FROM (
    SELECT p.*,
           -- a handshake that validated on another attempt clears the endpoint
           NOT p.ep_ok AND coalesce(c.ok, (c.measurement_id IS NULL AND (coalesce(k.c_http_ok, false) OR coalesce(k.c_tls_ok, false)))) AS reached
    FROM ep p
    JOIN _a_m m USING (measurement_id)
    LEFT JOIN _a_ctl k USING (measurement_id)
    LEFT JOIN (SELECT measurement_id, ip, port, bool_or(success AND coalesce(cert_valid, true)) AS ok FROM tls_handshakes
               WHERE side = 'control' GROUP BY ALL) c
           ON c.measurement_id = p.measurement_id AND c.ip = p.ip AND c.port = p.port
) p
GROUP BY p.measurement_id;
