-- A delivery written once (issue 17): the inbox event is inserted with its outcome, after the
-- decision, instead of inserted `received` and updated at the end. The update moved the row
-- out of the partial index of unfinished events, so it was never a HOT update: every fresh
-- delivery wrote its event twice, each time with every index entry. Same signature, result
-- and decisions as 0008 (tests/test_receive_delivery.py holds them to status.py).
--
-- Order of locks: an event stored and unfinished (a redelivery of a failed or pending one)
-- is locked first, then the training, as `replay` and the sweep's pending events lock
-- them; a delivery not stored yet locks its training, decides, and only then inserts its
-- event: a concurrent delivery of the same webhook-id waits for the training's lock, then
-- finds the event stored and finished, and writes nothing (`duplicate`). A duplicate of a
-- finished event is one index lookup and no write.
CREATE OR REPLACE FUNCTION receive_delivery(
    p_training_id text,
    p_status text,
    p_source text,
    p_destination text,
    p_version_id text,
    p_weights_url text,
    p_error text,
    p_started_at timestamptz,
    p_completed_at timestamptz,
    p_event_id text,
    p_signed_at timestamptz,
    p_payload jsonb,
    p_keep_untracked boolean
) RETURNS TABLE (
    outcome text,
    reason text,
    event_recorded boolean,
    status_changed boolean,
    transition_id bigint,
    from_replicate_status text,
    from_training_status text,
    id text,
    user_id text,
    training_status text,
    replicate_status text,
    destination text,
    version_id text,
    weights_url text,
    error text,
    started_at timestamptz,
    completed_at timestamptz,
    created_at timestamptz,
    updated_at timestamptz,
    updated_by text,
    next_check_at timestamptz,
    last_checked_at timestamptz,
    check_failures integer,
    needs_attention text,
    -- The row was written without a status move: a report filled in fields it lacked.
    fields_refreshed boolean
)
LANGUAGE plpgsql
-- One row, always: without this the planner takes 1,000 rows and joins the effects that
-- read FROM `changed` (the host table's mirror) by scanning their whole table.
ROWS 1
SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
DECLARE
    v_row trainings%ROWTYPE;
    v_stored text;
    v_store boolean := false;
    v_tracked boolean;
    v_current text;
    v_current_rank integer;
    v_reported_rank integer;
    v_from_replicate_status text;
    v_from_training_status text;
    v_outcome text;
    v_reason text;
    v_fields text[] := ARRAY['destination', 'version_id', 'weights_url', 'error',
        'started_at', 'completed_at'];
    v_new text[];
    v_old text[];
    v_overwritten text[] := '{}';
    v_changes boolean := false;
    v_refreshed boolean := false;
    v_moved boolean;
    v_replicate_status text;
    v_training_status text;
    v_transition_id bigint;
    v_recorded boolean := true;
BEGIN
    IF p_event_id IS NOT NULL AND p_payload IS NOT NULL THEN
        SELECT e.outcome INTO v_stored FROM webhook_events AS e
        WHERE e.webhook_id = p_event_id;
        v_store := NOT FOUND;
        IF v_stored IN ('received', 'pending', 'failed') THEN
            SELECT e.outcome INTO v_stored FROM webhook_events AS e
            WHERE e.webhook_id = p_event_id FOR UPDATE;
        END IF;
        IF v_stored NOT IN ('received', 'pending', 'failed') THEN
            v_outcome := 'duplicate';
        END IF;
    END IF;

    IF v_outcome IS NULL THEN
        SELECT * INTO v_row FROM trainings AS t WHERE t.id = p_training_id FOR UPDATE;
        v_tracked := FOUND;
    END IF;

    IF v_tracked THEN
        -- status.effective_replicate_status: a row the host wrote as finished is terminal.
        v_current := COALESCE(v_row.replicate_status, CASE v_row.training_status
            WHEN 'completed' THEN 'succeeded' WHEN 'failed' THEN 'failed'
            WHEN 'canceled' THEN 'canceled' END);

        -- status.rank: nothing yet < starting < processing < an unknown status < terminal.
        v_current_rank := CASE WHEN v_current IS NULL THEN -1
            WHEN v_current = 'starting' THEN 0 WHEN v_current = 'processing' THEN 1
            WHEN v_current IN ('succeeded', 'failed', 'canceled', 'aborted') THEN 3 ELSE 2 END;
        v_reported_rank := CASE WHEN p_status = 'starting' THEN 0
            WHEN p_status = 'processing' THEN 1
            WHEN p_status IN ('succeeded', 'failed', 'canceled', 'aborted') THEN 3 ELSE 2 END;
        v_from_replicate_status := v_row.replicate_status;
        v_from_training_status := v_row.training_status;

        -- status.decide (a rank of 3 is terminal)
        IF v_current IS NOT DISTINCT FROM p_status THEN
            v_outcome := 'unchanged';
            v_reason := 'same status';
        ELSIF v_current_rank = 3 THEN
            IF v_reported_rank = 3 THEN
                v_outcome := 'conflict';
                v_reason := p_status || ' contradicts terminal ' || v_current;
            ELSE
                v_outcome := 'ignored';
                v_reason := p_status || ' after terminal ' || v_current;
            END IF;
        ELSIF v_reported_rank < v_current_rank THEN
            v_outcome := 'ignored';
            v_reason := p_status || ' would move ' || v_current || ' backwards';
        ELSIF v_reported_rank = v_current_rank THEN
            v_outcome := 'unchanged';
            v_reason := p_status || ' is not past ' || v_current;
        ELSE
            v_outcome := 'applied';
            v_reason := COALESCE(v_current, 'none') || ' -> ' || p_status;
        END IF;

        -- service.decide: the fields the report would change (it knows them, the row lacks
        -- or holds them differently), and a terminal row's are only filled in
        -- (status.decide_fields), named in REFRESHED_COLUMNS' order. Compared as text:
        -- within one session two timestamps give the same text exactly when they are the
        -- same instant.
        IF v_outcome NOT IN ('ignored', 'conflict') THEN
            v_new := ARRAY[p_destination, p_version_id, p_weights_url, p_error,
                p_started_at::text, p_completed_at::text];
            v_old := ARRAY[v_row.destination, v_row.version_id, v_row.weights_url,
                v_row.error, v_row.started_at::text, v_row.completed_at::text];
            FOR i IN 1 .. cardinality(v_fields) LOOP
                IF v_new[i] IS NOT NULL AND v_new[i] IS DISTINCT FROM v_old[i] THEN
                    v_changes := true;
                    IF v_old[i] IS NOT NULL THEN
                        v_overwritten := v_overwritten || v_fields[i];
                    END IF;
                END IF;
            END LOOP;
            IF v_current_rank = 3 AND cardinality(v_overwritten) > 0 THEN
                v_outcome := 'conflict';
                v_reason := 'would change ' || array_to_string(v_overwritten, ', ')
                    || ' of terminal ' || v_current;
            END IF;
        END IF;
    ELSIF v_outcome IS NULL THEN
        v_outcome := 'pending';
        v_reason := 'training is not tracked';
    END IF;

    -- The event, before the row's writes: a delivery that lost a race to another delivery
    -- of the same webhook-id finds it here, and has written nothing.
    IF v_store THEN
        IF v_tracked OR NOT p_keep_untracked THEN
            INSERT INTO webhook_events (webhook_id, training_id, source, signed_at, payload,
                outcome, attempts, processed_at)
            VALUES (p_event_id, p_training_id, p_source, p_signed_at, p_payload, v_outcome,
                1, now())
            ON CONFLICT (webhook_id) DO NOTHING;
        ELSE
            -- Left `received`: the caller adopts the training, then applies the event.
            INSERT INTO webhook_events (webhook_id, training_id, source, signed_at, payload)
            VALUES (p_event_id, p_training_id, p_source, p_signed_at, p_payload)
            ON CONFLICT (webhook_id) DO NOTHING;
        END IF;
        IF NOT FOUND THEN
            SELECT e.outcome INTO v_stored FROM webhook_events AS e
            WHERE e.webhook_id = p_event_id FOR UPDATE;
            v_store := false;
            IF v_stored NOT IN ('received', 'pending', 'failed') THEN
                v_outcome := 'duplicate';
            END IF;
        END IF;
    END IF;
    IF v_outcome = 'duplicate' THEN
        RETURN QUERY SELECT 'duplicate'::text, 'already processed'::text, false, false,
            NULL::bigint, NULL::text, NULL::text, p_training_id, NULL::text, NULL::text,
            NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::timestamptz,
            NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::text,
            NULL::timestamptz, NULL::timestamptz, NULL::integer, NULL::text, false;
        RETURN;
    END IF;
    IF NOT v_store AND p_event_id IS NOT NULL AND (v_tracked OR NOT p_keep_untracked) THEN
        UPDATE webhook_events AS e SET outcome = v_outcome, error = NULL,
            attempts = e.attempts + 1, processed_at = now()
        WHERE e.webhook_id = p_event_id AND e.outcome IN ('received', 'pending', 'failed');
        v_recorded := FOUND;
    END IF;

    IF NOT v_tracked THEN
        NULL;
    ELSIF v_outcome IN ('ignored', 'conflict') THEN
        INSERT INTO training_transitions (training_id, source, outcome, from_replicate_status,
            to_replicate_status, from_training_status, to_training_status, reason)
        VALUES (v_row.id, p_source, v_outcome, v_row.replicate_status, p_status,
            v_row.training_status, v_row.training_status, v_reason);
    ELSE
        v_moved := v_outcome = 'applied';
        v_refreshed := v_changes AND NOT v_moved;
        IF v_moved OR v_changes THEN
            v_replicate_status := CASE WHEN v_moved THEN p_status ELSE v_row.replicate_status END;
            -- status.app_status_for
            v_training_status := CASE WHEN NOT v_moved THEN v_row.training_status
                WHEN p_status = 'succeeded' THEN 'completed'
                WHEN p_status = 'failed' THEN 'failed'
                WHEN p_status IN ('canceled', 'aborted') THEN 'canceled'
                ELSE 'training' END;
            UPDATE trainings AS t SET
                replicate_status = v_replicate_status,
                training_status = v_training_status,
                updated_at = now(),
                updated_by = p_source,
                destination = COALESCE(p_destination, t.destination),
                version_id = COALESCE(p_version_id, t.version_id),
                weights_url = COALESCE(p_weights_url, t.weights_url),
                error = COALESCE(p_error, t.error),
                started_at = COALESCE(p_started_at, t.started_at),
                completed_at = COALESCE(p_completed_at, t.completed_at)
            WHERE t.id = v_row.id
            RETURNING t.* INTO v_row;
            IF v_moved THEN
                INSERT INTO training_transitions (training_id, source, outcome,
                    from_replicate_status, to_replicate_status, from_training_status,
                    to_training_status, reason, replicate_completed_at)
                VALUES (v_row.id, p_source, 'applied', v_from_replicate_status,
                    v_row.replicate_status, v_from_training_status, v_row.training_status,
                    v_reason, p_completed_at)
                RETURNING training_transitions.id INTO v_transition_id;
            END IF;
        END IF;
    END IF;

    -- An untracked training's row is all NULL but its id.
    RETURN QUERY SELECT v_outcome, v_reason, v_recorded, v_transition_id IS NOT NULL,
        v_transition_id, v_from_replicate_status, v_from_training_status,
        COALESCE(v_row.id, p_training_id), v_row.user_id, v_row.training_status,
        v_row.replicate_status, v_row.destination, v_row.version_id, v_row.weights_url,
        v_row.error, v_row.started_at, v_row.completed_at, v_row.created_at,
        v_row.updated_at, v_row.updated_by, v_row.next_check_at, v_row.last_checked_at,
        v_row.check_failures, v_row.needs_attention, v_refreshed;
END;
$$;
