-- The contract the host platform reads: one row per Replicate training.
CREATE TABLE trainings (
    id text PRIMARY KEY,
    user_id text NOT NULL,
    training_status text NOT NULL DEFAULT 'training'
        CHECK (training_status IN ('training', 'completed', 'failed', 'canceled')),
    replicate_status text,
    destination text,
    version_id text,
    weights_url text,
    error text,
    started_at timestamptz,
    completed_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL DEFAULT 'track'
        CHECK (updated_by IN ('track', 'webhook', 'poll', 'replay')),
    -- Poller bookkeeping: when to look next, who holds the lease, how it went.
    next_check_at timestamptz NOT NULL DEFAULT now(),
    lease_owner text,
    lease_expires_at timestamptz,
    last_checked_at timestamptz,
    check_failures integer NOT NULL DEFAULT 0,
    not_found_count integer NOT NULL DEFAULT 0,
    needs_attention text
);

-- The sweep's queue: only rows still in progress, oldest check first.
CREATE INDEX trainings_due_idx ON trainings (next_check_at) WHERE training_status = 'training';

-- The inbox: every verified delivery (and every replay), stored before it is applied.
CREATE TABLE webhook_events (
    webhook_id text PRIMARY KEY,
    training_id text,
    source text NOT NULL DEFAULT 'webhook' CHECK (source IN ('webhook', 'replay')),
    received_at timestamptz NOT NULL DEFAULT now(),
    signed_at timestamptz,
    payload jsonb NOT NULL,
    outcome text NOT NULL DEFAULT 'received'
        CHECK (outcome IN ('received', 'applied', 'unchanged', 'ignored', 'conflict',
                           'pending', 'failed')),
    error text,
    attempts integer NOT NULL DEFAULT 0,
    processed_at timestamptz
);

CREATE INDEX webhook_events_received_at_idx ON webhook_events (received_at);
CREATE INDEX webhook_events_training_idx ON webhook_events (training_id, received_at);
CREATE INDEX webhook_events_unfinished_idx ON webhook_events (training_id)
    WHERE outcome IN ('received', 'pending', 'failed');

-- Every decision about a status report, applied or refused: the audit trail and the
-- delivery-gap telemetry (which path reached a terminal status, and how late).
CREATE TABLE training_transitions (
    id bigserial PRIMARY KEY,
    training_id text NOT NULL,
    source text NOT NULL CHECK (source IN ('track', 'webhook', 'poll', 'replay')),
    outcome text NOT NULL CHECK (outcome IN ('applied', 'ignored', 'conflict')),
    from_replicate_status text,
    to_replicate_status text NOT NULL,
    from_training_status text NOT NULL,
    to_training_status text NOT NULL,
    reason text,
    replicate_completed_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX training_transitions_training_idx ON training_transitions (training_id, id);
CREATE INDEX training_transitions_created_at_idx ON training_transitions (created_at);
