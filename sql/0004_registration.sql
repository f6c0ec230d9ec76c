-- Registration (issue 14): trainings discovery looked at and found not ours, the list
-- walk's high-water mark, the API's pages, and an insert that wakes the worker.

-- A training of the account that discovery fetched once and could not attribute to a
-- user: it is never fetched again for that (one GET per foreign training, ever).
CREATE TABLE foreign_trainings (
    id text PRIMARY KEY,
    reason text NOT NULL,
    replicate_created_at timestamptz,
    seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX foreign_trainings_seen_at_idx ON foreign_trainings (seen_at);

-- One row: Replicate's creation time of the newest training the last discovery listed, so
-- the next one reads further pages only while they hold trainings created since then.
CREATE TABLE discovery_marks (
    id boolean PRIMARY KEY DEFAULT true,
    newest_created_at timestamptz,
    discovered_at timestamptz NOT NULL DEFAULT now()
);
-- At most one row, without a CHECK (CHECK constraints hold only vocabulary words).
CREATE UNIQUE INDEX discovery_marks_one_row_idx ON discovery_marks ((true));

-- `GET /v1/trainings` pages newest first, for everyone or for one user.
CREATE INDEX trainings_created_idx ON trainings (created_at DESC, id DESC);
CREATE INDEX trainings_user_created_idx ON trainings (user_id, created_at DESC, id DESC);

-- A row inserted by anyone (the host platform's own INSERT included) wakes the worker,
-- which applies the webhooks waiting for it and checks it at Replicate at once. The
-- channel is the install's own: `training_inserted` in the default schema,
-- `<schema>_training_inserted` in any other, like `training_status`.
CREATE FUNCTION notify_training_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        CASE WHEN TG_TABLE_SCHEMA = 'webhook_sync' THEN 'training_inserted'
             ELSE TG_TABLE_SCHEMA || '_training_inserted' END,
        NEW.id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER trainings_inserted AFTER INSERT ON trainings
    FOR EACH ROW EXECUTE FUNCTION notify_training_inserted();
