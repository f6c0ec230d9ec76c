-- The Replicate request budget every process using one token shares: a token bucket per
-- token (named by a hash of it, never the token), refilled by the clock and spent by one
-- statement (`budget.py`), so N web and M worker processes stay under REPLICATE_MAX_RPS.
CREATE TABLE replicate_budgets (
    name text PRIMARY KEY,
    tokens double precision NOT NULL,
    -- What the last statement handed out: the bucket is spent and read in one UPDATE.
    last_grant integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT statement_timestamp()
);

-- One row per worker process: when its last sweep started and finished, and how it went,
-- so that the web process's /metrics and `doctor` can tell that the worker works.
CREATE TABLE worker_heartbeats (
    worker text PRIMARY KEY,
    sweep_started_at timestamptz,
    sweep_finished_at timestamptz,
    -- The last finished sweep's summary (the fields of its `sweep` log line).
    summary jsonb,
    -- Set while sweeps fail (`replicate_auth` for a refused token), cleared by a success.
    last_error text,
    last_error_kind text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX worker_heartbeats_finished_idx ON worker_heartbeats (sweep_finished_at);
