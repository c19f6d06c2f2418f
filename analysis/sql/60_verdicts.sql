-- 60_verdicts: one verdict per measurement, by rules applied in order.
-- Grain: _a_verdicts has one row per measurement in the scope.
-- Columns: measurement_id, input, status, layer, method, confidence, confirmed,
--   evidence (JSON: rule, compared, fingerprint_set).
-- How it works: _a_f joins every per-measurement signal; the CASE below picks
--   the FIRST rule that holds (the order is the precedence, and it matters:
--   an offline probe or a site down for everyone must never be called
--   censorship; DNS tampering explains the TCP/TLS/HTTP failures that follow
--   it; a page that arrived over validated TLS is not blocked); _a_rules maps
--   each rule to its verdict.
-- Caveats:
--   * confidence measures how strongly the evidence supports the status; an
--     inconclusive verdict has none (0).
--   * confirmed is true only for a blocked verdict on a measurement where a
--     known blockpage or DNS fingerprint matched.
--   * OONI-vague fingerprints (scope vbw) never confirm on their own.
CREATE OR REPLACE TEMP TABLE _a_rules (rule VARCHAR, status VARCHAR, layer VARCHAR, method VARCHAR, confidence DOUBLE);
INSERT INTO _a_rules VALUES
    ('probe_offline',              'inconclusive', NULL,   NULL,               0.0),
    ('dns_fingerprint_bogon',      'blocked',      'dns',  'dns.bogon',        0.95),
    ('dns_fingerprint',            'blocked',      'dns',  'dns.inconsistent', 0.95),
    ('dns_nxdomain',               'blocked',      'dns',  'dns.nxdomain',     0.9),
    ('dns_nxdomain_redirect_host', 'blocked',      'dns',  'dns.nxdomain',     0.8),
    ('dns_bogon',                  'blocked',      'dns',  'dns.bogon',        0.95),
    ('dns_bogon_redirect_host',    'blocked',      'dns',  'dns.bogon',        0.85),
    ('dns_late_duplicate',         'blocked',      'dns',  'dns.injected',     0.9),
    ('dns_forged_on_two_paths',    'blocked',      'dns',  'dns.injected',     0.7),
    ('dns_timeout',                'blocked',      'dns',  'dns.timeout',      0.7),
    ('dns_answer_for_nonexistent', 'blocked',      'dns',  'dns.inconsistent', 0.8),
    ('dns_unvouched_then_failed',  'blocked',      'dns',  'dns.inconsistent', 0.7),
    ('dns_blockpage_from_foreign_address', 'blocked', 'dns', 'dns.inconsistent', 0.9),
    ('http_blockpage_fingerprint', 'blocked',      'http', 'http.blockpage',   0.95),
    ('no_control_https_ok',        'ok',           NULL,   NULL,               0.6),
    ('no_control',                 'inconclusive', NULL,   NULL,               0.0),
    ('control_failed_probe_https_ok', 'ok',        NULL,   NULL,               0.6),
    ('down_control_dns',           'down',         NULL,   NULL,               0.8),
    ('down_control_tcp',           'down',         NULL,   NULL,               0.8),
    ('down_certificate',           'down',         NULL,   NULL,               0.8),
    ('tcp_refused',                'blocked',      'tcp',  'tcp.reset',        0.85),
    ('tcp_timeout',                'blocked',      'tcp',  'tcp.timeout',      0.8),
    ('http_plain_reset',           'blocked',      'http', 'http.reset',       0.85),
    ('http_plain_timeout',         'blocked',      'http', 'http.timeout',     0.75),
    ('tls_invalid_certificate',    'blocked',      'tls',  'tls.mitm',         0.9),
    ('tls_reset',                  'blocked',      'tls',  'tls.reset',        0.85),
    ('tls_alert',                  'blocked',      'tls',  'tls.reset',        0.6),
    ('tls_timeout',                'blocked',      'tls',  'tls.timeout',      0.75),
    ('tcp_family_refused',         'blocked',      'tcp',  'tcp.reset',        0.65),
    ('tcp_family_timeout',         'blocked',      'tcp',  'tcp.timeout',      0.6),
    ('slow_for_everyone',          'ok',           NULL,   NULL,               0.6),
    ('site_broken_redirect',       'down',         NULL,   NULL,               0.5),
    ('down_control_http',          'down',         NULL,   NULL,               0.5),
    ('control_http_failed_probe_ok', 'ok',         NULL,   NULL,               0.5),
    ('control_http_failed',        'inconclusive', NULL,   NULL,               0.0),
    ('http_reset',                 'blocked',      'http', 'http.reset',       0.8),
    ('slow_transfer',              'inconclusive', NULL,   NULL,               0.2),
    ('http_timeout_mid_body',      'blocked',      'http', 'http.timeout',     0.5),
    ('http_timeout',               'blocked',      'http', 'http.timeout',     0.75),
    ('probe_http_failed_unclassified', 'inconclusive', NULL, NULL,             0.0),
    ('server_side_https',          'server_side',  NULL,   NULL,               0.8),
    ('server_side_captcha',        'server_side',  NULL,   NULL,               0.6),
    ('server_side_same_server',    'server_side',  NULL,   NULL,               0.5),
    ('validated_https_page',       'ok',           NULL,   NULL,               0.8),
    ('control_refused_plain_http', 'inconclusive', NULL,   NULL,               0.0),
    ('dns_page_from_foreign_address', 'blocked',   'dns',  'dns.inconsistent', 0.6),
    ('http_status_differs',        'blocked',      'http', 'http.diff',        0.6),
    ('http_page_differs',          'blocked',      'http', 'http.diff',        0.5),
    ('page_matches_control',       'ok',           NULL,   NULL,               0.9),
    ('nothing_fetched',            'inconclusive', NULL,   NULL,               0.0);

CREATE OR REPLACE TEMP TABLE _a_fp_m AS
SELECT measurement_id, min(source || ':' || name) AS http_fp
FROM _a_fp_hits WHERE scope <> 'vbw'
GROUP BY measurement_id;

CREATE OR REPLACE TEMP TABLE _a_f AS
SELECT m.measurement_id, m.input, m.host, m.scheme, m.control_failure, m.probe_network_ok,
       k.measurement_id IS NOT NULL AS has_control,
       coalesce(k.c_addrs, 0) AS c_addrs, coalesce(k.c_addrs4, 0) AS c_addrs4, coalesce(k.c_nx, false) AS c_nx,
       k.c_dns_failure, coalesce(k.c_tcp_ok, false) AS c_tcp_ok, coalesce(k.c_tls_ok, false) AS c_tls_ok,
       coalesce(k.c_tls_certfail, false) AS c_tls_certfail, k.c_tls_certfail_what,
       coalesce(k.c_http_ok, false) AS c_http_ok, k.c_http_failure, k.c_status, k.c_title, k.c_len,
       d.* EXCLUDE (measurement_id),
       coalesce(t.p_tcp_ok, false) AS p_tcp_ok, coalesce(t.p_tcp_unreach, false) AS p_tcp_unreach,
       t.tcp_reset_ep, t.tcp_timeout_ep, t.tcp_family_ep, t.tcp_family, coalesce(t.tcp_family_refused, false) AS tcp_family_refused,
       coalesce(s.p_tls_certfail, false) AS p_tls_certfail, s.tls_reset_ep, s.tls_reset_failure, s.tls_alert_ep,
       s.tls_timeout_ep, s.tls_mitm_ep, s.tls_mitm_issuer, s.tls_mitm_error,
       h.measurement_id IS NOT NULL AS p_http_rows,
       h.f_url, h.f_scheme, h.f_ip, h.f_failure, h.f_status, h.f_title, h.f_len, h.f_server,
       coalesce(h.p_got_page, false) AS p_got_page, coalesce(h.f_https_valid, false) AS f_https_valid,
       coalesce(h.status_class_differs, false) AS status_class_differs, coalesce(h.title_differs, false) AS title_differs,
       coalesce(h.both_titles, false) AS both_titles, h.len_ratio, coalesce(h.captcha_like, false) AS captcha_like,
       coalesce(h.f_ip_foreign, false) AS f_ip_foreign, coalesce(h.f_still_flowing, false) AS f_still_flowing,
       k.c_server IS NOT NULL AND h.f_server = k.c_server AS same_server,
       fp.http_fp,
       o.measurement_id IS NOT NULL AS online_nearby
FROM _a_m m
LEFT JOIN _a_online_nearby o USING (measurement_id)
LEFT JOIN _a_ctl k USING (measurement_id)
LEFT JOIN _a_dns_m d USING (measurement_id)
LEFT JOIN _a_tcp_m t USING (measurement_id)
LEFT JOIN _a_tls_m s USING (measurement_id)
LEFT JOIN _a_http_m h USING (measurement_id)
LEFT JOIN _a_fp_m fp USING (measurement_id);

CREATE OR REPLACE TEMP TABLE _a_verdicts AS
WITH r AS (
    SELECT f.*,
           f.status_class_differs
           OR (f.title_differs AND (f.len_ratio < 0.7 OR (f.len_ratio IS NULL AND f.both_titles))) AS page_differs,
           CASE
           -- 1. The probe had no network: nothing it saw says anything about the site.
           WHEN (f.probe_network_ok = false
                 AND NOT (f.online_nearby AND f.has_control AND NOT f.p_dns_unreach AND NOT f.p_tcp_unreach))
             OR (NOT f.p_any_answer AND NOT f.p_tcp_ok AND f.f_status IS NULL
                 AND (NOT f.has_control OR f.p_dns_unreach OR f.p_tcp_unreach)) THEN 'probe_offline'
           -- 2. Known censorship addresses in DNS answers need no control.
           WHEN f.dns_fp IS NOT NULL AND f.dns_fp_bogon THEN 'dns_fingerprint_bogon'
           WHEN f.dns_fp IS NOT NULL THEN 'dns_fingerprint'
           -- 3. DNS against the control.
           WHEN f.has_control AND ((f.p_nx_input AND f.c_addrs > 0) OR (f.p_noanswer_input AND f.c_addrs4 > 0)) THEN 'dns_nxdomain'
           WHEN f.has_control AND f.p_nx_other AND f.c_http_ok THEN 'dns_nxdomain_redirect_host'
           WHEN f.has_control AND f.bogon_input IS NOT NULL THEN 'dns_bogon'
           WHEN f.has_control AND f.bogon_other IS NOT NULL AND f.c_http_ok THEN 'dns_bogon_redirect_host'
           WHEN f.has_control AND f.inj_first IS NOT NULL AND f.unvouched IS NOT NULL THEN 'dns_late_duplicate'
           WHEN f.has_control AND f.two_path_forgery AND (f.c_http_ok OR f.c_tls_ok)
                AND (f.unvouched_failed IS NOT NULL OR NOT f.p_got_page) THEN 'dns_forged_on_two_paths'
           WHEN f.has_control AND f.p_timeout_input AND f.p_addrs_input = 0 AND f.c_addrs > 0 THEN 'dns_timeout'
           WHEN f.has_control AND f.c_nx AND f.p_addrs_input > 0 AND f.unvouched IS NOT NULL THEN 'dns_answer_for_nonexistent'
           -- (one dead node among good ones is a CDN's problem, not tampering:
           -- some system answer must be vouched for to clear it)
           WHEN f.has_control AND f.unvouched_failed IS NOT NULL AND (f.c_http_ok OR f.c_tls_ok)
                AND NOT f.sys_any_vouched AND NOT f.p_got_page THEN 'dns_unvouched_then_failed'
           -- 4. A known blockpage needs no control either.
           -- (served from an address only the probe's resolver gave: DNS sent it there)
           WHEN f.http_fp IS NOT NULL AND f.has_control AND f.f_ip_foreign THEN 'dns_blockpage_from_foreign_address'
           WHEN f.http_fp IS NOT NULL THEN 'http_blockpage_fingerprint'
           -- 5. Without a control only validated TLS can vouch for a page.
           WHEN NOT f.has_control AND f.p_got_page AND f.f_https_valid AND f.f_status < 400 THEN 'no_control_https_ok'
           WHEN NOT f.has_control THEN 'no_control'
           -- 6. A page the probe got over validated HTTPS came from the site:
           -- a control that failed (a lossy path, a helper the site refuses)
           -- says nothing against it. (One blocked address family of the site,
           -- rule 7, still counts: the control connected to that endpoint.)
           WHEN NOT f.c_http_ok AND f.p_got_page AND f.f_https_valid AND f.f_status < 400
                AND f.tcp_family_ep IS NULL THEN 'control_failed_probe_https_ok'
           -- The control could not reach the site either: down, not blocked.
           WHEN NOT f.c_http_ok AND f.c_addrs = 0 THEN 'down_control_dns'
           WHEN NOT f.c_http_ok AND NOT f.c_tcp_ok THEN 'down_control_tcp'
           WHEN NOT f.c_http_ok AND f.c_tls_certfail AND NOT f.c_tls_ok THEN 'down_certificate'
           -- 7. Transport, on endpoints the control reached.
           WHEN f.tcp_reset_ep IS NOT NULL AND NOT f.p_got_page THEN 'tcp_refused'
           WHEN f.tcp_timeout_ep IS NOT NULL AND NOT f.p_got_page THEN 'tcp_timeout'
           -- A plain-HTTP hop that failed after connecting is an HTTP matter even
           -- if the side TLS handshakes on the same address failed too.
           WHEN f.c_http_ok AND f.f_scheme = 'http' AND f.f_failure IN ('connection_reset', 'eof_error') THEN 'http_plain_reset'
           WHEN f.c_http_ok AND f.f_scheme = 'http' AND f.f_failure = 'generic_timeout_error' AND f.f_status IS NULL THEN 'http_plain_timeout'
           WHEN f.tls_mitm_ep IS NOT NULL AND NOT f.p_got_page THEN 'tls_invalid_certificate'
           WHEN f.tls_reset_ep IS NOT NULL AND NOT f.p_got_page THEN 'tls_reset'
           WHEN f.tls_alert_ep IS NOT NULL AND NOT f.p_got_page THEN 'tls_alert'
           WHEN f.tls_timeout_ep IS NOT NULL AND NOT f.p_got_page THEN 'tls_timeout'
           -- One address family of the site blocked (the page perhaps fetched
           -- over the other): an endpoint the control connected to failed
           -- every attempt while that family works for the probe in this run.
           WHEN f.tcp_family_ep IS NOT NULL AND f.tcp_family_refused THEN 'tcp_family_refused'
           WHEN f.tcp_family_ep IS NOT NULL THEN 'tcp_family_timeout'
           -- 8. Slowness (throughput itself is the throttling test's question,
           -- judged by analysis/throttling.py): a fetch that timed out mid-body
           -- on a site that timed out for the control too.
           WHEN f.f_failure = 'generic_timeout_error' AND f.f_status IS NOT NULL
                AND f.c_http_failure = 'generic_timeout_error' THEN 'slow_for_everyone'
           -- 9. The probe's fetch against the control's.
           WHEN f.f_failure ILIKE '%redirect%' THEN 'site_broken_redirect'
           WHEN NOT f.c_http_ok AND NOT f.p_got_page THEN 'down_control_http'
           WHEN NOT f.c_http_ok AND f.f_status < 400 THEN 'control_http_failed_probe_ok'
           WHEN NOT f.c_http_ok THEN 'control_http_failed'
           WHEN f.f_failure IN ('connection_reset', 'eof_error') THEN 'http_reset'
           WHEN f.f_failure = 'generic_timeout_error' AND f.f_status IS NOT NULL AND f.f_still_flowing THEN 'slow_transfer'
           WHEN f.f_failure = 'generic_timeout_error' AND f.f_status IS NOT NULL THEN 'http_timeout_mid_body'
           WHEN f.f_failure = 'generic_timeout_error' THEN 'http_timeout'
           WHEN f.f_failure IS NOT NULL THEN 'probe_http_failed_unclassified'
           WHEN NOT f.p_http_rows THEN 'nothing_fetched'
           -- 10. The site itself refusing this network.
           WHEN f.f_https_valid AND (f.f_status IN (403, 429, 451) OR f.captcha_like) AND f.status_class_differs THEN 'server_side_https'
           WHEN f.captcha_like AND f.status_class_differs THEN 'server_side_captcha'
           WHEN f.f_status IN (403, 451) AND f.same_server AND NOT f.f_ip_foreign AND f.status_class_differs THEN 'server_side_same_server'
           -- 11. Direction: only the probe's refusal counts as blocking. A page
           -- that arrived over validated TLS came from the site, whatever the
           -- control got (sites refuse the data-centre addresses helpers live
           -- at: 403/503, a challenge, another page); over plain HTTP a
           -- refused control leaves nothing to compare the probe's page with.
           WHEN f.f_https_valid AND f.p_got_page AND f.f_status < 400
                AND (f.status_class_differs OR (f.title_differs AND (f.len_ratio < 0.7 OR (f.len_ratio IS NULL AND f.both_titles)))) THEN 'validated_https_page'
           WHEN f.p_got_page AND f.f_status < 400 AND f.c_status >= 400 AND f.status_class_differs THEN 'control_refused_plain_http'
           -- 12. Content.
           WHEN (f.status_class_differs OR (f.title_differs AND (f.len_ratio < 0.7 OR (f.len_ratio IS NULL AND f.both_titles))))
                AND f.f_ip_foreign THEN 'dns_page_from_foreign_address'
           WHEN f.status_class_differs THEN 'http_status_differs'
           WHEN f.title_differs AND (f.len_ratio < 0.7 OR (f.len_ratio IS NULL AND f.both_titles)) THEN 'http_page_differs'
           WHEN f.p_got_page THEN 'page_matches_control'
           ELSE 'nothing_fetched'
           END AS rule
    FROM _a_f f
)
SELECT r.measurement_id, r.input, x.status, x.layer,
       x.method,
       CASE WHEN r.rule = 'http_page_differs' AND r.len_ratio IS NULL THEN 0.4
            -- 35_packets: an injected RST/FIN/response seen on the wire
            WHEN x.status = 'blocked' AND x.layer IN ('tcp', 'tls', 'http') AND pk.injected_packets > 0
                THEN greatest(x.confidence, 0.95)
            ELSE x.confidence END AS confidence,
       x.status = 'blocked' AND (r.dns_fp IS NOT NULL OR r.http_fp IS NOT NULL) AS confirmed,
       json_object(
           'rule', r.rule,
           'compared', CASE
               WHEN r.rule = 'probe_offline' THEN json_object('evidence', 'probe offline', 'probe_network_ok', r.probe_network_ok,
                    'probe_dns_answers', r.p_any_answer, 'probe_tcp_ok', r.p_tcp_ok, 'control', r.has_control)
               WHEN r.rule LIKE 'dns_fingerprint%' THEN json_object('answer', r.dns_fp_ip, 'fingerprint', r.dns_fp)
               WHEN r.rule LIKE 'dns_nxdomain%' THEN json_object('probe_failure', r.p_input_failure, 'hostname', coalesce(r.p_nx_other_host, r.host),
                    'control_addresses', r.c_addrs)
               WHEN r.rule LIKE 'dns_bogon%' THEN json_object('bogon', coalesce(r.bogon_input, r.bogon_other), 'probe_answers', r.p_answers)
               WHEN r.rule = 'dns_late_duplicate' THEN json_object('first_response', r.inj_first, 'late_response', r.inj_late)
               WHEN r.rule = 'dns_forged_on_two_paths' THEN json_object('unvouched_answer', coalesce(r.unvouched_failed, r.unvouched), 'probe_answers', r.p_answers)
               WHEN r.rule = 'dns_timeout' THEN json_object('probe_failure', r.p_input_failure, 'control_addresses', r.c_addrs)
               WHEN r.rule = 'dns_answer_for_nonexistent' THEN json_object('probe_answers', r.p_answers, 'control_failure', r.c_dns_failure)
               WHEN r.rule = 'dns_unvouched_then_failed' THEN json_object('unvouched_answer', r.unvouched_failed, 'probe_answers', r.p_answers)
               WHEN r.rule IN ('http_blockpage_fingerprint', 'dns_blockpage_from_foreign_address') THEN json_object('fingerprint', r.http_fp, 'probe_status', r.f_status, 'probe_title', r.f_title,
                    'address', r.f_ip, 'address_resolved_by_control', NOT r.f_ip_foreign)
               WHEN r.rule = 'control_failed_probe_https_ok' THEN json_object('url', r.f_url, 'probe_status', r.f_status, 'probe_title', r.f_title,
                    'validated_https', true, 'control_http_failure', r.c_http_failure, 'control_tcp_ok', r.c_tcp_ok)
               WHEN r.rule IN ('no_control', 'no_control_https_ok') THEN json_object('control_failure', r.control_failure, 'probe_status', r.f_status, 'url', r.f_url)
               WHEN r.rule LIKE 'down_%' THEN json_object('control_http_failure', r.c_http_failure, 'control_dns_failure', r.c_dns_failure,
                    'control_tcp_ok', r.c_tcp_ok, 'control_tls_failure', r.c_tls_certfail_what, 'probe_failure', r.f_failure)
               WHEN r.rule = 'tcp_refused' THEN json_object('endpoint', r.tcp_reset_ep, 'probe_failure', 'connection_refused', 'control', 'connected')
               WHEN r.rule = 'tcp_timeout' THEN json_object('endpoint', r.tcp_timeout_ep, 'probe_failure', 'generic_timeout_error', 'control', 'connected')
               WHEN r.rule = 'tls_invalid_certificate' THEN json_object('endpoint', r.tls_mitm_ep, 'certificate_error', r.tls_mitm_error,
                    'issuer', r.tls_mitm_issuer, 'control', 'valid certificate')
               WHEN r.rule IN ('tls_reset', 'tls_alert') THEN json_object('endpoint', coalesce(r.tls_reset_ep, r.tls_alert_ep),
                    'probe_failure', coalesce(r.tls_reset_failure, 'ssl_failed_handshake'), 'control', 'handshake ok')
               WHEN r.rule IN ('tcp_family_refused', 'tcp_family_timeout') THEN json_object('endpoint', r.tcp_family_ep,
                    'family', r.tcp_family,
                    'probe_failure', CASE WHEN r.tcp_family_refused THEN 'connection_refused' ELSE 'generic_timeout_error' END,
                    'control', 'connected', 'family_works', 'another ' || r.tcp_family || ' connect of the probe succeeded in this run',
                    'page_fetched', r.p_got_page, 'address', r.f_ip)
               WHEN r.rule = 'tls_timeout' THEN json_object('endpoint', r.tls_timeout_ep, 'probe_failure', 'generic_timeout_error', 'control', 'handshake ok')
               WHEN r.rule = 'slow_for_everyone' THEN json_object('probe_failure', r.f_failure, 'control_http_failure', r.c_http_failure)
               ELSE json_object('url', r.f_url, 'probe_failure', r.f_failure, 'probe_status', r.f_status, 'control_status', r.c_status,
                    'probe_title', r.f_title, 'control_title', r.c_title, 'probe_length', r.f_len, 'control_length', r.c_len,
                    'length_ratio', round(r.len_ratio, 3), 'address', r.f_ip, 'address_resolved_by_control', NOT r.f_ip_foreign,
                    'control_http_failure', r.c_http_failure)
               END,
           'fingerprint_set', '{{FINGERPRINT_SET}}') AS evidence
FROM r
JOIN _a_rules x USING (rule)
LEFT JOIN _a_packets pk USING (measurement_id);
