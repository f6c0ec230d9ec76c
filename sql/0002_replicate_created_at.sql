-- Replicate's own creation time of a training, stored by the poller on its first check.
-- It bounds the sweep's walk of the newest-first listing exactly; `created_at` is only
-- when our row was inserted, which can be long after (a backfill).
ALTER TABLE trainings ADD COLUMN replicate_created_at timestamptz;
