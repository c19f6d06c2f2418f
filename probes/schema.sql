-- Vantage storage schema: the one definition of every table and column (the
-- writer's column lists and types are parsed from this file: probes/schema.py).
-- This is the current schema (version: probes/schema.py SCHEMA_VERSION); an
-- older database is brought here by the numbered MIGRATIONS there, so a change
-- here needs a migration too. Documented for analysts in docs/schema.md.
-- Every observation row names its measurement and its side: 'probe' rows were
-- seen from the volunteer's network, 'control' rows from the helper's.
-- Times t0/t are seconds since the measurement started.

CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name VARCHAR NOT NULL,
    applied_at TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    test_name VARCHAR,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    status VARCHAR,              -- running | finished | partial | interrupted | timed_out | store_failed
    inputs_total INTEGER,
    options JSON,                -- the options the run was started with (for --resume)
    probe_cc VARCHAR,
    probe_asn VARCHAR,
    software_version VARCHAR,
    rescued INTEGER DEFAULT 0    -- records not stored, saved to the run's rescue file (migration 2)
);

CREATE TABLE IF NOT EXISTS run_inputs (
    run_id VARCHAR,
    position INTEGER,
    input VARCHAR,
    category_code VARCHAR
);

CREATE TABLE IF NOT EXISTS measurements (
    measurement_id VARCHAR PRIMARY KEY,
    run_id VARCHAR,
    test_name VARCHAR,
    test_version VARCHAR,
    input VARCHAR,
    domain VARCHAR,
    scheme VARCHAR,
    port INTEGER,
    category_code VARCHAR,
    start_time TIMESTAMP,
    runtime DOUBLE,
    probe_cc VARCHAR,
    probe_asn VARCHAR,
    resolver_asn VARCHAR,
    software_name VARCHAR,
    software_version VARCHAR,
    control_failure VARCHAR,     -- NULL when a control answered; else why not
    control_helper VARCHAR,      -- which helper answered
    probe_network_ok BOOLEAN,    -- FALSE when the probe itself had no network
    record JSON,                 -- the full record; response bodies live in http_transactions.body
    ooni_blocking VARCHAR,       -- OONI's own verdict, test_keys.blocking: false | dns | tcp_ip | http-failure | http-diff (migration 3)
    ooni_accessible BOOLEAN      -- OONI's test_keys.accessible (migration 3); both NULL for our own measurements
);

CREATE TABLE IF NOT EXISTS dns_answers (
    measurement_id VARCHAR,
    side VARCHAR,                -- probe | control
    transaction_id INTEGER,
    engine VARCHAR,              -- system | udp | doh
    resolver VARCHAR,
    hostname VARCHAR,
    query_type VARCHAR,
    response_index INTEGER,      -- 0: first response; >=1: late duplicates (injection evidence)
    failure VARCHAR,
    rcode VARCHAR,
    answer_type VARCHAR,         -- A | AAAA | CNAME, NULL when the response had no answer
    answer VARCHAR,
    ttl INTEGER,
    t0 DOUBLE,
    t DOUBLE
);

CREATE TABLE IF NOT EXISTS tcp_connects (
    measurement_id VARCHAR,
    side VARCHAR,
    transaction_id INTEGER,
    ip VARCHAR,
    port INTEGER,
    success BOOLEAN,
    failure VARCHAR,
    t0 DOUBLE,
    t DOUBLE,
    attempt INTEGER              -- x_attempt: 0 the first try, n the n-th retry of the same step (migration 4)
);

CREATE TABLE IF NOT EXISTS tls_handshakes (
    measurement_id VARCHAR,
    side VARCHAR,
    transaction_id INTEGER,
    ip VARCHAR,
    port INTEGER,
    server_name VARCHAR,
    success BOOLEAN,
    failure VARCHAR,
    tls_version VARCHAR,
    cipher_suite VARCHAR,
    cert_valid BOOLEAN,          -- does the presented certificate validate for server_name?
    cert_error VARCHAR,
    cert_subject VARCHAR,
    cert_issuer VARCHAR,
    cert_sha256 VARCHAR,
    cert_not_after VARCHAR,
    t0 DOUBLE,
    t DOUBLE,
    attempt INTEGER              -- x_attempt: 0 the first try, n the n-th retry of the same step (migration 4)
);

CREATE TABLE IF NOT EXISTS http_transactions (
    measurement_id VARCHAR,
    side VARCHAR,
    transaction_id INTEGER,
    redirect_index INTEGER,      -- 0: the input URL; n: the n-th redirect followed
    url VARCHAR,
    method VARCHAR,
    address VARCHAR,             -- ip:port the request went to, when known
    failure VARCHAR,
    status_code INTEGER,
    headers JSON,
    title VARCHAR,
    body_length BIGINT,          -- bytes received (decompressed), up to the cap
    body_truncated BOOLEAN,
    body_sha256 VARCHAR,
    body VARCHAR,                -- the first 64 KiB as text, for fingerprints
    t0 DOUBLE,
    t DOUBLE,
    attempt INTEGER              -- x_attempt: 0 the first try, n the n-th retry of the same step (migration 4)
);

CREATE TABLE IF NOT EXISTS network_events (
    measurement_id VARCHAR,
    side VARCHAR,
    transaction_id INTEGER,
    operation VARCHAR,           -- bytes_received | connect | tls_handshake_done | ...
    address VARCHAR,
    num_bytes BIGINT,
    t DOUBLE
);

CREATE TABLE IF NOT EXISTS throughput_samples (
    measurement_id VARCHAR,
    side VARCHAR,                -- probe | control
    variant VARCHAR,             -- target | scrambled | helper
    attempt INTEGER,
    ip VARCHAR,
    server_name VARCHAR,
    failure VARCHAR,
    bytes BIGINT,
    seconds DOUBLE,
    kbit_per_s DOUBLE
);

CREATE TABLE IF NOT EXISTS ip_info (
    measurement_id VARCHAR,
    side VARCHAR,                -- control: the helper's ip_info (migration 4)
    ip VARCHAR,
    asn INTEGER,                 -- autonomous system number; NULL or 0 when unknown
    flags INTEGER                -- OONI's bitmask: 1 resolved by the probe, 2 by the helper, 4 bogon, 8 valid TLS for the domain
);

-- What `vantage upload` sent and a collector acknowledged (migration 5): a
-- measurement without a row for the configured collector is pending.
CREATE TABLE IF NOT EXISTS uploads (
    measurement_id VARCHAR,
    collector VARCHAR,                 -- the collector's URL
    collector_measurement_id VARCHAR,  -- the collector's id for it (bk-003 measurement_id)
    report_id VARCHAR,                 -- the report it was submitted in
    uploaded_at TIMESTAMP              -- when the collector acknowledged it (UTC); one row per (measurement_id, collector)
);

CREATE TABLE IF NOT EXISTS packets (
    measurement_id VARCHAR,
    side VARCHAR,                -- probe (packets are read on the volunteer's side only) (migration 6)
    transaction_id INTEGER,      -- the step (TCP connect) the packet belongs to, when known
    kind VARCHAR,                -- capture: syn_ack | rst | fin | data; dns_injection: dns_answer | icmp; traceroute_<probe>
    flow VARCHAR,                -- capture: remote ip:port > local port (the packets of one connection)
    src VARCHAR,                 -- who sent it (as the IP header says)
    sport INTEGER,
    dport INTEGER,
    proto INTEGER,               -- 6 TCP, 17 UDP, 1 ICMP
    ip_ttl INTEGER,              -- the IP TTL it arrived with
    ip_id INTEGER,               -- its IP ID
    tcp_flags VARCHAR,           -- S A F R P letters
    length INTEGER,              -- bytes of the IP packet (as captured)
    t DOUBLE,
    baseline_ttl INTEGER,        -- capture: the IP TTL of the flow's SYN-ACK (else another flow's from the same server)
    baseline_ip_id INTEGER,      -- capture: the IP ID of that SYN-ACK
    injected BOOLEAN             -- capture: the probe's reading (TTL or IP ID off the server's own); analysis re-reads it
);

-- verdicts: owned and created by the analysis (analysis/sql/00_verdicts.sql).
