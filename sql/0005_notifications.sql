-- The outbox: signed notifications to the platform's own app (NOTIFY_URLS), one row per
-- status change and endpoint, written by the funnel in the same statement as the change.

-- The endpoints, synced from NOTIFY_URLS / NOTIFY_EVENTS by the worker (and by migrate):
-- the funnel reads them here, so every writer of a status agrees on where events go.
CREATE TABLE notification_endpoints (
    id bigserial PRIMARY KEY,
    url text NOT NULL UNIQUE,
    events text[] NOT NULL,
    -- false once the URL left NOTIFY_URLS; kept, because its notifications name it.
    configured boolean NOT NULL DEFAULT true,
    -- Set when the endpoint answered 410 Gone; cleared by `notifications retry`.
    disabled_at timestamptz,
    disabled_reason text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notifications (
    id bigserial PRIMARY KEY,
    -- The event id: the body's `id` and the `webhook-id` of every attempt.
    event_id text NOT NULL,
    endpoint_id bigint NOT NULL REFERENCES notification_endpoints (id),
    training_id text NOT NULL,
    event_type text NOT NULL
        CHECK (event_type IN ('training.processing', 'training.completed', 'training.failed',
                              'training.canceled')),
    payload jsonb NOT NULL,
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivered', 'dead')),
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner text,
    lease_expires_at timestamptz,
    last_attempt_at timestamptz,
    last_status_code integer,
    last_error text,
    delivered_at timestamptz,
    -- Set by `notifications retry`: NOTIFY_MAX_AGE then counts from here.
    retried_at timestamptz,
    UNIQUE (event_id, endpoint_id)
);

-- The notifier's queue: only undelivered rows, earliest attempt first.
CREATE INDEX notifications_due_idx ON notifications (next_attempt_at) WHERE status = 'pending';
-- Order per training and endpoint: a row waits while an earlier one of its pair is pending.
CREATE INDEX notifications_pending_order_idx ON notifications (training_id, endpoint_id, id)
    WHERE status = 'pending';
CREATE INDEX notifications_training_idx ON notifications (training_id, id);
CREATE INDEX notifications_created_at_idx ON notifications (created_at);
