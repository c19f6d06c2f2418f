-- 35_packets: injected-packet evidence from the packet capture (`vantage run
-- web`, on when privileged; probes/capture.py) and the packet probes.
-- Grain: _a_pk_marks has one row per captured TCP packet of an analysed
--   measurement that is not the server's SYN-ACK; _a_packets one row per
--   measurement with such packets.
-- A packet is marked injected when its IP TTL differs from the baseline the
--   probe recorded for its flow (the flow's SYN-ACK, else another flow's from
--   the same server, else the server's ICMP echo reply), or when its IP ID is
--   scapy's default 1 while the baseline's is not (a cheap forger's mark;
--   IPv6 has no IP ID: ip_id is NULL there and only the hop limit counts).
--   The analysis reads the TTLs itself rather than trusting packets.injected.
-- Use: 60_verdicts raises the confidence of a tcp/tls/http blocking verdict to
--   at least 0.95 when the measurement has an injected RST, FIN or response.
-- Caveats: a path change (ECMP) between the SYN-ACK and a RST can move a TTL
--   by one; a censor that copies the server's TTL and IP ID passes unseen.
CREATE OR REPLACE TEMP TABLE _a_pk_marks AS
SELECT p.measurement_id, p.flow, p.kind, p.src, p.ip_ttl, p.ip_id, p.baseline_ttl, p.baseline_ip_id,
       p.baseline_ttl IS NOT NULL AND (p.ip_ttl <> p.baseline_ttl
           OR coalesce(p.ip_id = 1 AND coalesce(p.baseline_ip_id, -1) <> 1, false)) AS injected
FROM packets p
JOIN _a_m m USING (measurement_id)
WHERE p.side = 'probe' AND p.proto = 6 AND p.kind IN ('rst', 'fin', 'data');

CREATE OR REPLACE TEMP TABLE _a_packets AS
SELECT measurement_id,
       count(*) FILTER (WHERE injected) AS injected_packets,
       count(*) FILTER (WHERE injected AND kind = 'rst') AS injected_rsts,
       count(*) FILTER (WHERE NOT injected AND kind = 'rst' AND baseline_ttl IS NOT NULL) AS genuine_rsts,
       list(DISTINCT kind) FILTER (WHERE injected) AS injected_kinds
FROM _a_pk_marks
GROUP BY measurement_id;
