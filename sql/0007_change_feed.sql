-- The change feed (`webhook-sync changes`, docs/changes.md): every applied transition is
-- stamped with the id of the transaction that wrote it, so that a reader can take only
-- the changes of transactions that can no longer commit (`xact_id` below its snapshot's
-- xmin) and never skip one that commits late with a lower position.
--
-- Rows written before this migration get 0: lower than any transaction id PostgreSQL
-- hands out (normal ids start at 3), so they come first in the feed, in id order, which
-- is their order of insertion; they committed long ago, so none of them can be late. A
-- constant default is also what makes this ALTER cheap: PostgreSQL records it in the
-- catalog instead of rewriting the table. The writers (the funnel, the refused-report
-- insert) do not name the column: the default below stamps every new row.
ALTER TABLE training_transitions ADD COLUMN xact_id xid8 NOT NULL DEFAULT '0';
ALTER TABLE training_transitions ALTER COLUMN xact_id SET DEFAULT pg_current_xact_id();

-- The feed's order, for applied changes only (refused reports are not in the feed): a
-- reader after position (x, i) walks this index from there.
CREATE INDEX training_transitions_feed_idx ON training_transitions (xact_id, id)
    WHERE outcome = 'applied';
