-- 40_http: the probe's HTTP chain, its last hop against the control's page, and
-- blockpage fingerprints.
-- Grain:
--   _a_http_m   one row per measurement with probe HTTP rows: the last hop
--               (highest redirect_index) and its comparison with the control.
--   _a_fp_hits  one row per (measurement, hop, fingerprint) that matched.
-- Columns (_a_http_m): f_* of the last hop (url, scheme, ip, failure, status,
--   title, length, server header), p_got_page, status/title/length comparisons
--   (len_ratio = smaller/larger body), captcha-like flag, fp_name,
--   f_still_flowing (a timeout while bytes were still arriving).
-- Caveats:
--   * The last hop is that of the last attempt: the probe fetches again only
--     after a failure (column attempt), so a fetch that worked once is the
--     last one.
--   * Dynamic pages change bodies on every load: a body that differs while the
--     status class and the title match is not an anomaly. Length is compared
--     only when neither side was truncated at its cap.
--   * OONI writes status 0 for "no response"; it is read as NULL.
--   * An https page that arrived means the probe validated the certificate for
--     the host (the probe fetches with verification on).
--   * Fingerprints are matched only on responses that differ from the control
--     (or have no control to differ from): a page identical to the control's is
--     not a blockpage, and skipping it keeps the regex scan affordable.
--   * Any false-positive signature (Censored Planet's list, OONI's scope "fp")
--     matching a response cancels every blockpage match on it.
-- A view, not a table: only the last hop of most measurements is needed, and
-- arg_max finds it without sorting every hop.
CREATE OR REPLACE TEMP VIEW _a_hops AS
SELECT h.measurement_id, h.redirect_index, h.transaction_id, h.url,
       lower(regexp_extract(h.url, '^([A-Za-z][A-Za-z0-9+.-]*)://', 1)) AS hop_scheme,
       _a_endpoint_ip(h.address) AS ip,
       h.failure, nullif(h.status_code, 0) AS status_code, h.title, h.body_length, h.body_truncated, h.body_sha256, h.body, h.headers
FROM http_transactions h
WHERE h.side = 'probe' {{AND_IN_SCOPE}};

CREATE OR REPLACE TEMP TABLE _a_http_m AS
WITH last AS (
    SELECT measurement_id,
           arg_max(struct_pack(redirect_index, transaction_id, url, failure, status_code, title, body_length, body_truncated,
                               body_sha256, headers, address, t),
                   (coalesce(attempt, 0), coalesce(redirect_index, 0), coalesce(t0, 0), coalesce(transaction_id, 0))) AS h
    FROM http_transactions
    WHERE side = 'probe' {{AND_IN_SCOPE}}
    GROUP BY measurement_id
), f AS (
    SELECT measurement_id, h.url, h.failure, nullif(h.status_code, 0) AS status_code, h.title, h.body_length,
           h.body_truncated, h.body_sha256,
           lower(regexp_extract(h.url, '^([A-Za-z][A-Za-z0-9+.-]*)://', 1)) AS hop_scheme,
           _a_endpoint_ip(h.address) AS ip,
           coalesce(json_extract_string(h.headers, '$.Server'), json_extract_string(h.headers, '$.server')) AS f_server,
           h.transaction_id AS f_txid, h.t AS f_t
    FROM last
), flow AS (
    -- A fetch that timed out while bytes were still arriving (the last byte
    -- came less than 2 s before the deadline) was slow, not stalled: that is
    -- a throughput question for the throttling test, not evidence of blocking.
    -- A censor that freezes a flow shows a long silence before the deadline.
    SELECT e.measurement_id, sum(e.num_bytes) AS bytes, max(e.t) AS last_byte_t
    FROM network_events e JOIN f ON f.measurement_id = e.measurement_id AND e.transaction_id = f.f_txid
    WHERE f.failure = 'generic_timeout_error' AND e.side = 'probe' AND e.operation = 'bytes_received'
    GROUP BY e.measurement_id
)
SELECT f.measurement_id, f.url AS f_url, f.hop_scheme AS f_scheme, f.ip AS f_ip, f.failure AS f_failure,
       f.status_code AS f_status, f.title AS f_title, f.body_length AS f_len, f.f_server,
       f.failure IS NULL AND f.status_code IS NOT NULL AND NOT (f.status_code BETWEEN 300 AND 399) AS p_got_page,
       f.hop_scheme = 'https' AND f.status_code IS NOT NULL AS f_https_valid,
       k.c_status IS NOT NULL AND f.status_code IS NOT NULL AND f.status_code // 100 <> k.c_status // 100 AS status_class_differs,
       lower(trim(coalesce(f.title, ''))) <> lower(trim(coalesce(k.c_title, ''))) AS title_differs,
       f.title IS NOT NULL AND k.c_title IS NOT NULL AS both_titles,
       CASE WHEN coalesce(f.body_truncated, false) OR coalesce(k.c_trunc, false) OR f.body_length IS NULL OR k.c_len IS NULL THEN NULL
            WHEN greatest(f.body_length, k.c_len) = 0 THEN 1.0
            ELSE least(f.body_length, k.c_len) / greatest(f.body_length, k.c_len) END AS len_ratio,
       k.c_sha IS NOT NULL AND f.body_sha256 = k.c_sha AS same_body,
       false AS captcha_like,
       f.ip IS NOT NULL AND ci.ip IS NULL AND sa.ip IS NULL AND coalesce(k.c_addrs, 0) > 0 AS f_ip_foreign,
       coalesce(flow.bytes > 0 AND f.f_t - flow.last_byte_t < 2.0, false) AS f_still_flowing
FROM f
LEFT JOIN flow USING (measurement_id)
LEFT JOIN _a_ctl k USING (measurement_id)
LEFT JOIN _a_ctl_ip ci ON ci.measurement_id = f.measurement_id AND ci.ip = f.ip
LEFT JOIN _a_same_as sa ON sa.measurement_id = f.measurement_id AND sa.ip = f.ip;

-- Challenge pages only matter for refusals (403/429/503): look at those bodies alone.
UPDATE _a_http_m SET captcha_like = true
FROM http_transactions h
WHERE h.measurement_id = _a_http_m.measurement_id AND h.side = 'probe' AND _a_http_m.f_status IN (403, 429, 503)
  AND h.url IS NOT DISTINCT FROM _a_http_m.f_url AND nullif(h.status_code, 0) = _a_http_m.f_status
  AND (regexp_matches(coalesce(h.title, ''), '(?i)just a moment|attention required|captcha|are you a robot|are you human|security check|ddos-guard')
       OR regexp_matches(coalesce(h.body, ''), '(?i)cf-chl-|cf_chl_opt|g-recaptcha|h-captcha|hcaptcha\.com|challenge-platform'));

-- Responses worth a fingerprint scan: every hop of a measurement whose last
-- hop does not plainly match the control's page.
CREATE OR REPLACE TEMP TABLE _a_resp AS
SELECT h.measurement_id, h.redirect_index, coalesce(h.body, '') AS body,
       coalesce(array_to_string(list_transform(list_filter(json_keys(h.headers), lambda k: k <> '' AND NOT contains(k, '"') AND NOT contains(k, chr(92))),
           lambda k: lower(k) || ': ' || coalesce(json_extract_string(h.headers, '$."' || k || '"'), '')), chr(10)), '') AS htext,
       coalesce(array_to_string(list_transform(list_filter(json_keys(h.headers), lambda k: k <> '' AND NOT contains(k, '"') AND NOT contains(k, chr(92))),
           lambda k: k || ': ' || coalesce(json_extract_string(h.headers, '$."' || k || '"'), '')), chr(13) || chr(10)), '')
           || chr(13) || chr(10) || chr(13) || chr(10) || coalesce(h.body, '') AS rtext
FROM _a_hops h
JOIN _a_http_m f USING (measurement_id)
LEFT JOIN _a_ctl k USING (measurement_id)
WHERE h.status_code IS NOT NULL
  AND NOT coalesce(f.same_body, false)
  AND (NOT coalesce(k.c_http_ok, false) OR f.f_failure IS NOT NULL OR f.status_class_differs
       OR f.title_differs OR coalesce(f.len_ratio, 1.0) < 0.7 OR h.status_code BETWEEN 300 AND 399);

CREATE OR REPLACE TEMP TABLE _a_fp_hits AS
WITH scanned AS (
    SELECT *,
           {{MATCH body IN body}} AS hit_body,
           {{MATCH htext IN header}} AS hit_header,
           {{MATCH rtext IN response}} AS hit_response,
           {{FALSE_POSITIVE}} AS false_positive
    FROM _a_resp
)
SELECT s.measurement_id, s.redirect_index, p.source, p.name, p.scope
FROM scanned s
JOIN fp_http p ON NOT p.false_positive AND (
       (p.location = 'body' AND s.hit_body AND regexp_matches(s.body, p.regex))
    OR (p.location = 'header' AND s.hit_header AND regexp_matches(s.htext, p.regex))
    OR (p.location = 'response' AND s.hit_response AND regexp_matches(s.rtext, p.regex)))
WHERE (s.hit_body OR s.hit_header OR s.hit_response) AND NOT s.false_positive;
