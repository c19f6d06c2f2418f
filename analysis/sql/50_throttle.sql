-- 50_throttle: the throttling hook. Everything about throughput that the
-- verdict rules consume goes through _a_throttle, so a better statistic can
-- replace this file without touching 60_verdicts.
-- Grain: one row per measurement that has throughput samples.
-- Columns: t_status ('throttled' | 'ok'), t_method ('throttle.sni' |
--   'throttle.ip' | NULL), t_confidence, t_compared (JSON with the medians).
-- Baseline rule (medians of kbit/s per side and variant):
--   * probe target < 0.5 x probe scrambled-SNI  -> throttle.sni (the SNI/Host
--     is what is slowed: same server, other name, fast);
--   * probe target and scrambled both < 0.5 x control -> throttle.ip;
--   * otherwise, if the control is as slow as the probe, the site is slow for
--     everyone: t_status 'ok' (this also clears a probe fetch that timed out
--     mid-body on such a site).
-- Caveats: medians of a handful of attempts; no significance test yet. Rows
-- where neither comparison is possible are left out (no opinion).
CREATE OR REPLACE TEMP TABLE _a_throttle AS
WITH s AS (
    SELECT measurement_id,
           median(kbit_per_s) FILTER (WHERE side = 'probe' AND variant = 'target') AS p_target,
           median(kbit_per_s) FILTER (WHERE side = 'probe' AND variant = 'scrambled') AS p_scrambled,
           median(kbit_per_s) FILTER (WHERE side = 'control') AS c_rate
    FROM throughput_samples
    WHERE failure IS NULL AND kbit_per_s > 0 {{AND_IN_SCOPE}}
    GROUP BY measurement_id
)
SELECT measurement_id,
       CASE WHEN p_target < 0.5 * p_scrambled THEN 'throttled'
            WHEN p_target < 0.5 * c_rate AND p_scrambled < 0.5 * c_rate THEN 'throttled'
            -- 'ok' only when something as good as the control says so; a slow
            -- target with nothing to compare gives no opinion (NULL).
            WHEN p_target >= 0.5 * coalesce(c_rate, p_scrambled) THEN 'ok' END AS t_status,
       CASE WHEN p_target < 0.5 * p_scrambled THEN 'throttle.sni'
            WHEN p_target < 0.5 * c_rate AND p_scrambled < 0.5 * c_rate THEN 'throttle.ip' END AS t_method,
       CASE WHEN p_target < 0.25 * coalesce(p_scrambled, c_rate) THEN 0.8 ELSE 0.6 END AS t_confidence,
       json_object('probe_target_kbit', round(p_target, 1), 'probe_scrambled_kbit', round(p_scrambled, 1),
                   'control_kbit', round(c_rate, 1)) AS t_compared
FROM s
WHERE p_target IS NOT NULL AND (p_scrambled IS NOT NULL OR c_rate IS NOT NULL);
