-- Failure handling in SQL, so that the relay, the CLI and an admin at a psql
-- prompt share one implementation. docs/dlq.md shows how to use it.

-- Failures of unknown class, counted apart from `attempts` (which counts
-- every failed attempt): only they use up relay.max_attempts, so a long
-- broker outage never makes a row "exhausted".
ALTER TABLE outbox ADD COLUMN unknown_failures integer NOT NULL DEFAULT 0;

-- Retry delay: exponential in the attempt number, capped, with "equal
-- jitter" (half fixed, half random). Computed by the database so relays with
-- skewed clocks agree on when a row becomes claimable again. The jitter is a
-- parameter so that one statement can give every row it reschedules the same
-- one (see outbox_schedule_retry).
CREATE FUNCTION outbox_retry_delay(p_attempts integer, p_base_ms bigint, p_cap_ms bigint,
                                   p_jitter float8 DEFAULT random())
RETURNS interval
LANGUAGE sql IMMUTABLE AS $$
    SELECT make_interval(secs => d / 2000.0 + p_jitter * d / 2000.0)
    FROM (SELECT least(p_cap_ms::float8,
                       p_base_ms * power(2.0, least(greatest(p_attempts - 1, 0), 40))) AS d) AS s
$$;

-- Permanent failure: the row leaves the outbox and enters the DLQ in the
-- same transaction, intact, with a machine-readable reason. A row that was
-- replayed before and fails again reuses its DLQ entry (same event id),
-- keeping its first failure time and replay count.
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
               occurred_at = EXCLUDED.occurred_at,
               publisher = EXCLUDED.publisher,
               reason = EXCLUDED.reason,
               last_error = EXCLUDED.last_error,
               attempts = EXCLUDED.attempts,
               dead_lettered_at = now(),
               state = 'dead',
               discarded_at = NULL,
               discarded_by = NULL,
               discard_reason = NULL
        RETURNING 1
    )
    SELECT count(*)::integer FROM inserted
$$;

-- A failed attempt that may be retried. Each row records one more attempt,
-- its error, and becomes claimable again after the backoff delay. Rows whose
-- failure is of unknown class (p_unknown) also count it in
-- unknown_failures; the one that reaches p_max_attempts moves to the DLQ as
-- retries_exhausted instead. Returns the ids dead-lettered that way.
--
-- One jitter value per call: rows that failed together with the same attempt
-- count become claimable at the same instant, so the id-ordered claim takes
-- them again in their original order.
CREATE FUNCTION outbox_schedule_retry(p_ids bigint[], p_errors text[], p_unknown boolean[],
                                      p_max_attempts integer, p_base_ms bigint, p_cap_ms bigint)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    jitter    float8 := random();
    -- The failure's time, not the claim's (the transaction's now()): a step
    -- that waited message.timeout.ms for Kafka would otherwise have used up
    -- the delay already. Taken once, so that rows failing together come due
    -- at exactly the same instant.
    failed_at timestamptz := clock_timestamp();
    exhausted bigint[];
    messages  text[];
BEGIN
    SELECT coalesce(array_agg(o.id ORDER BY o.id), '{}'),
           coalesce(array_agg(format('gave up after %s attempts (%s failures of unknown class, relay.max_attempts = %s): %s',
                                     o.attempts + 1, o.unknown_failures + 1, p_max_attempts, i.err)
                              ORDER BY o.id), '{}')
      INTO exhausted, messages
      FROM outbox o
      JOIN unnest(p_ids, p_errors, p_unknown) AS i(id, err, unknown) ON o.id = i.id
     WHERE i.unknown AND o.unknown_failures + 1 >= p_max_attempts;

    IF cardinality(exhausted) > 0 THEN
        PERFORM outbox_dead_letter(exhausted,
                                   array_fill('retries_exhausted'::text, ARRAY[cardinality(exhausted)]),
                                   messages);
    END IF;

    UPDATE outbox o
       SET attempts = o.attempts + 1,
           unknown_failures = o.unknown_failures + i.unknown::integer,
           last_error = i.err,
           first_failed_at = coalesce(o.first_failed_at, failed_at),
           available_at = failed_at + outbox_retry_delay(o.attempts + 1, p_base_ms, p_cap_ms, jitter)
      FROM unnest(p_ids, p_errors, p_unknown) AS i(id, err, unknown)
     WHERE o.id = i.id
       AND o.id <> ALL (exhausted);

    RETURN QUERY SELECT unnest(exhausted);
END
$$;

-- What an admin looks at first: dead events by reason and type, with age.
CREATE VIEW outbox_dlq_summary AS
SELECT reason,
       event_type,
       count(*)                       AS events,
       min(dead_lettered_at)          AS oldest,
       max(dead_lettered_at)          AS newest,
       now() - min(dead_lettered_at)  AS oldest_dead_for,
       now() - min(occurred_at)       AS oldest_event_age
  FROM outbox_dlq
 WHERE state = 'dead'
 GROUP BY reason, event_type;

-- Dead events one by one, oldest first, with their age: what
-- `outbox-relay dlq list` prints. Filters as for replay; NULL = any.
CREATE FUNCTION outbox_dlq_list(
    p_event_type text DEFAULT NULL,
    p_reason text DEFAULT NULL,
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL,
    p_event_id text DEFAULT NULL,
    p_limit bigint DEFAULT 100
) RETURNS TABLE (
    event_id text, event_type text, tenant_id text, reason text, last_error text,
    attempts integer, occurred_at timestamptz, first_failed_at timestamptz,
    dead_lettered_at timestamptz, state text, replay_count integer, outbox_id bigint,
    dead_for interval
)
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT d.event_id, d.event_type, d.tenant_id, d.reason, d.last_error,
           d.attempts, d.occurred_at, d.first_failed_at,
           d.dead_lettered_at, d.state, d.replay_count, d.outbox_id,
           now() - d.dead_lettered_at
      FROM outbox_dlq d
     WHERE d.state = 'dead'
       AND (p_event_id IS NULL OR d.event_id = p_event_id)
       AND (p_event_type IS NULL OR d.event_type = p_event_type)
       AND (p_reason IS NULL OR d.reason = p_reason)
       AND (p_from IS NULL OR d.dead_lettered_at >= p_from)
       AND (p_to IS NULL OR d.dead_lettered_at < p_to)
     ORDER BY d.dead_lettered_at, d.outbox_id
     LIMIT p_limit
$$;

-- SECURITY DEFINER functions must never resolve a table name to a caller's
-- temporary table (a temp `outbox_dlq` would let an admin replay forged
-- events under the owner's rights): their search_path is pinned to
-- pg_catalog, this schema, and pg_temp last. Called after every migration
-- that adds such a function.
CREATE FUNCTION outbox_pin_search_path() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.prosecdef AND p.pronamespace = current_schema()::regnamespace
           AND p.proname LIKE 'outbox%'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f, current_schema());
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION outbox_pin_search_path() FROM PUBLIC;

-- The admin functions run with the outbox owner's rights (SECURITY DEFINER)
-- so that the admin role needs EXECUTE only: it cannot write the outbox or
-- the DLQ directly. A replayed row keeps its original publisher, or
-- '(unknown)' when it had none, so the relay's publisher check still applies.

-- Replays the dead events that match every given filter (NULL = any) back
-- into the outbox with their original event_id and occurred_at, a new
-- ordering id and a fresh attempt count. Idempotent: only entries in state
-- 'dead' are replayed, and an event whose id is already in the outbox is
-- left alone (and stays 'dead'), so replaying twice never makes two rows.
-- Concurrent replays serialize on the DLQ rows. Returns the replayed ids.
CREATE FUNCTION outbox_dlq_replay(
    p_event_type text DEFAULT NULL,
    p_reason text DEFAULT NULL,
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL,
    p_event_id text DEFAULT NULL
) RETURNS SETOF text
LANGUAGE sql SECURITY DEFINER AS $$
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

-- Replays one event by id; true when it went back into the outbox.
CREATE FUNCTION outbox_dlq_replay_event(p_event_id text) RETURNS boolean
LANGUAGE sql SECURITY DEFINER AS $$
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
LANGUAGE plpgsql SECURITY DEFINER AS $$
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

REVOKE ALL ON FUNCTION outbox_dead_letter(bigint[], text[], text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_schedule_retry(bigint[], text[], boolean[], integer, bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_dlq_list(text, text, timestamptz, timestamptz, text, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_dlq_replay(text, text, timestamptz, timestamptz, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_dlq_replay_event(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_dlq_discard(text, text, text, text, timestamptz, timestamptz) FROM PUBLIC;
REVOKE ALL ON outbox_dlq_summary FROM PUBLIC;

-- The relay's functions run with its own rights (it holds UPDATE/DELETE on
-- outbox and INSERT/UPDATE on outbox_dlq).
GRANT EXECUTE ON FUNCTION outbox_dead_letter(bigint[], text[], text[]) TO outbox_relay;
GRANT EXECUTE ON FUNCTION outbox_schedule_retry(bigint[], text[], boolean[], integer, bigint, bigint) TO outbox_relay;

GRANT EXECUTE ON FUNCTION outbox_dlq_list(text, text, timestamptz, timestamptz, text, bigint) TO outbox_admin;
GRANT EXECUTE ON FUNCTION outbox_dlq_replay(text, text, timestamptz, timestamptz, text) TO outbox_admin;
GRANT EXECUTE ON FUNCTION outbox_dlq_replay_event(text) TO outbox_admin;
GRANT EXECUTE ON FUNCTION outbox_dlq_discard(text, text, text, text, timestamptz, timestamptz) TO outbox_admin;
GRANT SELECT ON outbox_dlq_summary TO outbox_admin;

SELECT outbox_pin_search_path();
