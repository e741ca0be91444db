-- Failure handling in SQL, so that the relay, the CLI and an admin at a psql
-- prompt share one implementation.

-- Retry delay: exponential in the attempt number, capped, with "equal
-- jitter" (half fixed, half random). Computed by the database so relays with
-- skewed clocks agree on when a row becomes claimable again.
CREATE FUNCTION outbox_retry_delay(p_attempts integer, p_base_ms bigint, p_cap_ms bigint) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT make_interval(secs => d / 2000.0 + random() * d / 2000.0)
    FROM (SELECT least(p_cap_ms::float8, p_base_ms * power(2.0, least(greatest(p_attempts - 1, 0), 40))) AS d) AS s
$$;

-- Transient failure: the row stays, one more attempt is recorded, and it
-- becomes claimable again after the backoff delay.
CREATE FUNCTION outbox_schedule_retry(p_ids bigint[], p_errors text[], p_base_ms bigint, p_cap_ms bigint)
RETURNS integer
LANGUAGE sql AS $$
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_errors) AS t(id, err)
    ), updated AS (
        UPDATE outbox o
           SET attempts = o.attempts + 1,
               last_error = i.err,
               first_failed_at = coalesce(o.first_failed_at, now()),
               available_at = now() + outbox_retry_delay(o.attempts + 1, p_base_ms, p_cap_ms)
          FROM input i
         WHERE o.id = i.id
        RETURNING 1
    )
    SELECT count(*)::integer FROM updated
$$;

-- Permanent failure: the row leaves the outbox and enters the DLQ in the
-- same transaction, intact, with a machine-readable reason. A row that was
-- replayed before and fails again reuses its DLQ entry (same event id).
CREATE FUNCTION outbox_dead_letter(p_ids bigint[], p_reasons text[], p_errors text[])
RETURNS integer
LANGUAGE sql AS $$
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_reasons, p_errors) AS t(id, reason, err)
    ), moved AS (
        DELETE FROM outbox o USING input i
         WHERE o.id = i.id
        RETURNING o.*, i.reason, i.err
    ), inserted AS (
        INSERT INTO outbox_dlq AS d (event_id, outbox_id, event_type, tenant_id, payload, headers,
                                     occurred_at, publisher, reason, last_error, attempts, first_failed_at)
        SELECT event_id, id, event_type, tenant_id, payload, headers,
               occurred_at, publisher, reason, err, attempts + 1, coalesce(first_failed_at, now())
          FROM moved
        ON CONFLICT (event_id) DO UPDATE
           SET outbox_id = EXCLUDED.outbox_id,
               event_type = EXCLUDED.event_type,
               tenant_id = EXCLUDED.tenant_id,
               payload = EXCLUDED.payload,
               headers = EXCLUDED.headers,
               publisher = EXCLUDED.publisher,
               reason = EXCLUDED.reason,
               last_error = EXCLUDED.last_error,
               attempts = EXCLUDED.attempts,
               dead_lettered_at = now(),
               state = 'dead'
        RETURNING 1
    )
    SELECT count(*)::integer FROM inserted
$$;

-- What an admin looks at first: dead events by reason and type, with age.
CREATE VIEW outbox_dlq_summary AS
SELECT reason,
       event_type,
       count(*)                    AS events,
       min(dead_lettered_at)       AS oldest,
       max(dead_lettered_at)       AS newest,
       now() - min(occurred_at)    AS oldest_event_age
  FROM outbox_dlq
 WHERE state = 'dead'
 GROUP BY reason, event_type;

-- The admin functions run with the outbox owner's rights (SECURITY DEFINER)
-- so that the admin role needs EXECUTE only: it cannot write the outbox or
-- the DLQ directly. A replayed row keeps its original publisher, or
-- '(unknown)' when it had none, so the relay's publisher check still applies.

-- Replays the dead events that match every given filter (NULL = any) back
-- into the outbox with their original event_id and occurred_at and a fresh
-- attempt count. Idempotent: an event already back in the outbox, or not in
-- state 'dead', is not replayed again. Returns the replayed event ids.
CREATE FUNCTION outbox_dlq_replay(
    p_event_type text DEFAULT NULL,
    p_reason text DEFAULT NULL,
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL,
    p_event_id text DEFAULT NULL
) RETURNS SETOF text
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH candidates AS (
        SELECT d.event_id
          FROM outbox_dlq d
         WHERE d.state = 'dead'
           AND (p_event_id IS NULL OR d.event_id = p_event_id)
           AND (p_event_type IS NULL OR d.event_type = p_event_type)
           AND (p_reason IS NULL OR d.reason = p_reason)
           AND (p_from IS NULL OR d.dead_lettered_at >= p_from)
           AND (p_to IS NULL OR d.dead_lettered_at < p_to)
         ORDER BY d.outbox_id
           FOR UPDATE
    ), reinserted AS (
        INSERT INTO outbox (event_id, event_type, tenant_id, payload, headers, occurred_at, publisher)
        SELECT d.event_id, d.event_type, d.tenant_id, d.payload, d.headers, d.occurred_at,
               coalesce(d.publisher, '(unknown)')
          FROM outbox_dlq d JOIN candidates c USING (event_id)
         ORDER BY d.outbox_id
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id
    ), marked AS (
        UPDATE outbox_dlq d
           SET state = 'replayed',
               replay_count = d.replay_count + 1,
               last_replayed_at = now()
          FROM reinserted r
         WHERE d.event_id = r.event_id
        RETURNING d.event_id
    )
    SELECT event_id FROM marked
$$;

-- Replays one event by id.
CREATE FUNCTION outbox_dlq_replay_event(p_event_id text) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT EXISTS (SELECT 1 FROM outbox_dlq_replay(p_event_id => p_event_id))
$$;

-- Discards dead events matching the filters, with a recorded reason. The
-- row stays in the table for the record. Returns the discarded event ids.
CREATE FUNCTION outbox_dlq_discard(
    p_why text,
    p_event_id text DEFAULT NULL,
    p_event_type text DEFAULT NULL,
    p_reason text DEFAULT NULL,
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL
) RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF p_why IS NULL OR btrim(p_why) = '' THEN
        RAISE EXCEPTION 'a discard needs a reason' USING ERRCODE = '22023';
    END IF;
    IF p_event_id IS NULL AND p_event_type IS NULL AND p_reason IS NULL AND p_from IS NULL AND p_to IS NULL THEN
        RAISE EXCEPTION 'refusing to discard every dead event: give an event id or a filter'
            USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    UPDATE outbox_dlq d
       SET state = 'discarded', discarded_at = now(), discarded_by = session_user, discard_reason = p_why
     WHERE d.state = 'dead'
       AND (p_event_id IS NULL OR d.event_id = p_event_id)
       AND (p_event_type IS NULL OR d.event_type = p_event_type)
       AND (p_reason IS NULL OR d.reason = p_reason)
       AND (p_from IS NULL OR d.dead_lettered_at >= p_from)
       AND (p_to IS NULL OR d.dead_lettered_at < p_to)
    RETURNING d.event_id;
END
$$;

REVOKE ALL ON FUNCTION outbox_dlq_replay(text, text, timestamptz, timestamptz, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_dlq_replay_event(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_dlq_discard(text, text, text, text, timestamptz, timestamptz) FROM PUBLIC;
REVOKE ALL ON outbox_dlq_summary FROM PUBLIC;

GRANT EXECUTE ON FUNCTION outbox_dlq_replay(text, text, timestamptz, timestamptz, text) TO outbox_admin;
GRANT EXECUTE ON FUNCTION outbox_dlq_replay_event(text) TO outbox_admin;
GRANT EXECUTE ON FUNCTION outbox_dlq_discard(text, text, text, text, timestamptz, timestamptz) TO outbox_admin;
GRANT SELECT ON outbox_dlq_summary TO outbox_admin;
