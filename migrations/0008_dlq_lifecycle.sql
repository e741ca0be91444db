-- DLQ repair, a replay that reports instead of failing, and a data
-- lifecycle consistent with permanent dedupe. docs/dlq.md describes the
-- workflow, docs/operations.md the runbooks.
--
-- Locks: processed_event_ids is renamed and becomes a partition of a new
-- partitioned table of the same name (ACCESS EXCLUSIVE until commit, two
-- sequential scans of the old table, no copy: see below); outbox_dlq gets
-- one index. As in 0007, the migration gives up (and rolls back whole)
-- after 10 s waiting for a lock instead of queueing consumers behind it:
-- run it again.
SET LOCAL lock_timeout = '10s';

-- The dedupe horizon: how old a redelivery of an event can ever be. Consumer
-- dedupe rows are kept at least this long after the event's time, and a DLQ
-- replay (or repair) of an event older than this is refused unless forced,
-- so "permanent" dedupe means "longer than any redelivery", never
-- "unbounded". Kafka retention is days to weeks; the horizon's default is
-- more than a year. A database setting because SQL functions enforce it.
ALTER TABLE outbox_config
    ADD COLUMN dedupe_horizon_days integer NOT NULL DEFAULT 400
        CHECK (dedupe_horizon_days BETWEEN 30 AND 36500);

-- The horizon as an interval (0 rows: a schema without config is refused
-- by the callers' NOT NULL checks).
CREATE FUNCTION outbox_dedupe_horizon() RETURNS interval
LANGUAGE sql STABLE AS $$
    SELECT make_interval(days => dedupe_horizon_days) FROM outbox_config
$$;

-- Sets the horizon (admin). Lowering it lets the next purge drop dedupe
-- rows earlier and replays refuse younger events, so it is bounded below.
CREATE FUNCTION outbox_set_dedupe_horizon(p_days integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF p_days IS NULL OR p_days NOT BETWEEN 30 AND 36500 THEN
        RAISE EXCEPTION 'the dedupe horizon must be between 30 and 36500 days, not %', p_days
            USING ERRCODE = '22023',
                  HINT = 'It must exceed the oldest redelivery you allow: Kafka retention and any DLQ replay delay.';
    END IF;
    UPDATE outbox_config SET dedupe_horizon_days = p_days;
    RETURN p_days;
END
$$;

-- The time of a lowercase ULID (its first 10 characters, milliseconds since
-- the epoch); NULL for any other id. Ids of the outbox are ULIDs unless a
-- writer chose another 26-character id.
-- Not STRICT: the planner folds a STRICT call with a NULL constant before
-- the EXECUTE privilege is checked, and nobody but the owner may call these.
CREATE FUNCTION outbox_ulid_time(p_id text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    a  constant text := '0123456789abcdefghjkmnpqrstvwxyz';
    ms bigint := 0;
BEGIN
    IF p_id IS NULL OR p_id !~ '^[0-7][0-9a-hjkmnp-tv-z]{25}$' THEN
        RETURN NULL;
    END IF;
    FOR i IN 1..10 LOOP
        ms := ms * 32 + strpos(a, substr(p_id, i, 1)) - 1;
    END LOOP;
    RETURN to_timestamp(ms / 1000.0);
END
$$;

-- The smallest ULID of an instant: its 10 time characters and 16 zeros.
-- Lowercase ULIDs sort by time (in the "C" collation and any other that
-- orders digits before letters), so a month of event ids is the range
-- [ulid_floor(month start), ulid_floor(next month start)).
CREATE FUNCTION outbox_ulid_floor(p_at timestamptz) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    a   constant text := '0123456789abcdefghjkmnpqrstvwxyz';
    t   bigint := floor(extract(epoch FROM p_at) * 1000)::bigint;
    out text := '';
BEGIN
    IF p_at IS NULL THEN
        RETURN NULL;
    END IF;
    FOR i IN 1..10 LOOP
        out := substr(a, (t & 31)::int + 1, 1) || out;
        t := t >> 5;
    END LOOP;
    RETURN out || repeat('0', 16);
END
$$;

-- The age a DLQ replay is judged by: the older of the event's time and its
-- id's time. The id's time decides which dedupe partition holds the
-- consumers' row (and so when it is dropped); occurred_at is what a writer
-- stated. Either past the horizon means consumers may have forgotten it.
CREATE FUNCTION outbox_event_time(p_event_id text, p_occurred_at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT least(p_occurred_at, coalesce(outbox_ulid_time(p_event_id), p_occurred_at))
$$;

-- ---------------------------------------------------------------------------
-- The DLQ's audit trail: every repair (old and new content, who, when,
-- why), every forced replay past the horizon, and every row that was
-- dead-lettered again under the id of an entry that could not take it (its
-- whole row kept in `detail`, so nothing leaving the outbox is lost).
-- Append-only: admins and the relay may read it; only the owner's
-- functions and the relay's outbox_dead_letter add to it, and nobody but
-- the owner may change or delete a row.
CREATE TABLE outbox_dlq_revisions (
    event_id      text        NOT NULL,
    revision      integer     NOT NULL,
    kind          text        NOT NULL
                  CHECK (kind IN ('repair', 'forced_replay', 'dead_lettered_again')),
    -- The entry's content before, and what it became (repair) or what was
    -- refused (dead_lettered_again). A forced replay changes no content.
    old_payload   jsonb,
    old_tenant_id text,
    old_headers   jsonb,
    new_payload   jsonb,
    new_tenant_id text,
    new_headers   jsonb,
    -- Not insertable by the relay: always the session that made the row.
    made_by       text        NOT NULL DEFAULT session_user,
    made_at       timestamptz NOT NULL DEFAULT now(),
    why           text        NOT NULL CHECK (btrim(why) <> ''),
    detail        jsonb,
    PRIMARY KEY (event_id, revision)
);
COMMENT ON TABLE outbox_dlq_revisions IS
    'Append-only audit of DLQ repairs, forced replays and refused dead letters; see docs/dlq.md.';
REVOKE ALL ON outbox_dlq_revisions FROM PUBLIC;
GRANT SELECT ON outbox_dlq_revisions TO outbox_admin, outbox_relay;
GRANT INSERT (event_id, revision, kind, old_payload, old_tenant_id, old_headers,
              new_payload, new_tenant_id, new_headers, why, detail)
    ON outbox_dlq_revisions TO outbox_relay;

-- The "DLQ entries older than N days" alert reads the oldest dead entry
-- through this index, however many replayed and discarded rows there are.
CREATE INDEX outbox_dlq_dead_age_idx ON outbox_dlq (dead_lettered_at) WHERE state = 'dead';
-- outbox_dlq_purge finds old replayed and discarded entries.
CREATE INDEX outbox_dlq_settled_idx ON outbox_dlq (coalesce(discarded_at, last_replayed_at, dead_lettered_at))
    WHERE state <> 'dead';

-- Permanent failure, as in 0003, except that an existing entry is replaced
-- only when it was replayed (the event came back and failed again). An
-- entry still `dead` or `discarded` keeps its content: the row that failed
-- under its id (a writer that inserted the same id again) is compared with
-- it. Same content (event type, tenant, payload, headers, publisher): the
-- row leaves the outbox and the entry records the new failure. Other
-- content: the row leaves the outbox into outbox_dlq_revisions (kind
-- dead_lettered_again, the whole row in `detail`) and the entry's
-- last_error says so; an admin repairs the entry with that content if it
-- is the right one. Either way nothing that left the outbox is lost.
CREATE OR REPLACE FUNCTION outbox_dead_letter(p_ids bigint[], p_reasons text[], p_errors text[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r     record;
    d     outbox_dlq%ROWTYPE;
    moved integer := 0;
    rev   integer;
BEGIN
    FOR r IN
        WITH input AS (
            SELECT * FROM unnest(p_ids, p_reasons, p_errors) AS t(id, reason, err)
        )
        DELETE FROM outbox o USING input i
         WHERE o.id = i.id
        RETURNING o.*, i.reason AS dl_reason, i.err AS dl_error
    LOOP
        moved := moved + 1;
        -- Locked, so that a replay or repair of the same entry waits.
        SELECT * INTO d FROM outbox_dlq WHERE event_id = r.event_id FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO outbox_dlq (event_id, outbox_id, event_type, tenant_id, payload, headers,
                                    occurred_at, publisher, reason, last_error, attempts, first_failed_at)
            VALUES (r.event_id, r.id, r.event_type, r.tenant_id, r.payload, r.headers,
                    r.occurred_at, r.publisher, r.dl_reason, r.dl_error, r.attempts + 1,
                    coalesce(r.first_failed_at, now()));
        ELSIF d.state = 'replayed' THEN
            UPDATE outbox_dlq
               SET outbox_id = r.id, event_type = r.event_type, tenant_id = r.tenant_id,
                   payload = r.payload, headers = r.headers, occurred_at = r.occurred_at,
                   publisher = r.publisher, reason = r.dl_reason, last_error = r.dl_error,
                   attempts = r.attempts + 1, dead_lettered_at = now(), state = 'dead',
                   discarded_at = NULL, discarded_by = NULL, discard_reason = NULL
             WHERE event_id = r.event_id;
        ELSIF (d.event_type, d.tenant_id, d.payload, d.headers, d.publisher)
              IS NOT DISTINCT FROM (r.event_type, r.tenant_id, r.payload, r.headers, r.publisher) THEN
            IF d.state = 'dead' THEN
                UPDATE outbox_dlq
                   SET outbox_id = r.id, reason = r.dl_reason, last_error = r.dl_error,
                       attempts = d.attempts + r.attempts + 1
                 WHERE event_id = r.event_id;
            ELSE
                UPDATE outbox_dlq
                   SET last_error = d.last_error || format(E'\n%s: the same event failed again (%s): %s',
                                                            now(), r.dl_reason, r.dl_error)
                 WHERE event_id = r.event_id;
            END IF;
        ELSE
            SELECT coalesce(max(v.revision), 0) + 1 INTO rev
              FROM outbox_dlq_revisions v WHERE v.event_id = r.event_id;
            INSERT INTO outbox_dlq_revisions (event_id, revision, kind, old_payload, old_tenant_id, old_headers,
                                              new_payload, new_tenant_id, new_headers, why, detail)
            VALUES (r.event_id, rev, 'dead_lettered_again', d.payload, d.tenant_id, d.headers,
                    r.payload, r.tenant_id, r.headers,
                    format('dead-lettered (%s) while the entry was %s with other content: %s',
                           r.dl_reason, d.state, r.dl_error),
                    to_jsonb(r));
            UPDATE outbox_dlq
               SET last_error = d.last_error || format(E'\n%s: dead-lettered again (%s) with other content, kept as revision %s in outbox_dlq_revisions',
                                                        now(), r.dl_reason, rev)
             WHERE event_id = r.event_id;
        END IF;
    END LOOP;
    RETURN moved;
END
$$;

-- ---------------------------------------------------------------------------
-- Replay, entry by entry, reporting what it skipped and why instead of
-- failing as a whole. Filters as in 0003 (NULL = any). For each dead entry,
-- in original order:
--   older_than_horizon     its event is older than the dedupe horizon
--                          (consumers may have dropped its dedupe row):
--                          replayed only with p_force, recorded as a
--                          forced_replay revision with p_why
--   unknown_event_type     its type is not in outbox_catalog (declare it,
--                          `outbox-relay catalog sync`, replay again)
--   publisher_not_allowed  its publisher is not the catalog's publisher of
--                          its type (a replay would be dead-lettered again)
--   already_pending        its event id is in the outbox already
--   insert_failed          anything else the insert raised (in `detail`)
-- Each insert runs in its own subtransaction, so one refused entry never
-- undoes the others. Entries are locked in order; a concurrent replay waits
-- and then finds them replayed.
CREATE FUNCTION outbox_dlq_replay_report(
    p_event_type text DEFAULT NULL,
    p_reason text DEFAULT NULL,
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL,
    p_event_id text DEFAULT NULL,
    p_force boolean DEFAULT false,
    p_why text DEFAULT NULL
) RETURNS TABLE (event_id text, outcome text, reason text, detail text)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    d        outbox_dlq%ROWTYPE;
    horizon  interval := outbox_dedupe_horizon();
    expected text;
    forced   boolean;
    rev      integer;
BEGIN
    IF coalesce(p_force, false) AND (p_why IS NULL OR btrim(p_why) = '') THEN
        RAISE EXCEPTION 'a forced replay needs a reason (p_why): it is recorded in outbox_dlq_revisions'
            USING ERRCODE = '22023';
    END IF;
    FOR d IN
        SELECT * FROM outbox_dlq x
         WHERE x.state = 'dead'
           AND (p_event_id IS NULL OR x.event_id = p_event_id)
           AND (p_event_type IS NULL OR x.event_type = p_event_type)
           AND (p_reason IS NULL OR x.reason = p_reason)
           AND (p_from IS NULL OR x.dead_lettered_at >= p_from)
           AND (p_to IS NULL OR x.dead_lettered_at < p_to)
         ORDER BY x.outbox_id
           FOR UPDATE
    LOOP
        event_id := d.event_id;
        forced := false;
        IF outbox_event_time(d.event_id, d.occurred_at) < now() - horizon THEN
            IF NOT coalesce(p_force, false) THEN
                outcome := 'skipped';
                reason := 'older_than_horizon';
                detail := format('the event is from %s, older than the dedupe horizon (%s): consumers may have '
                                 'forgotten it; replay with force (and a reason) to publish it anyway',
                                 outbox_event_time(d.event_id, d.occurred_at), horizon);
                RETURN NEXT;
                CONTINUE;
            END IF;
            forced := true;
        END IF;
        SELECT c.publisher INTO expected FROM outbox_catalog c WHERE c.event_type = d.event_type;
        IF NOT FOUND THEN
            outcome := 'skipped';
            reason := 'unknown_event_type';
            detail := format('event type %s is not in outbox_catalog: declare it in a catalog file, run '
                             '`outbox-relay catalog sync`, then replay', d.event_type);
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF d.publisher IS DISTINCT FROM expected THEN
            outcome := 'skipped';
            reason := 'publisher_not_allowed';
            detail := format('publisher %s may not publish %s (the catalog allows only %s): discard it, '
                             'or have %s write it again', coalesce(d.publisher, '(none)'), d.event_type,
                             expected, expected);
            RETURN NEXT;
            CONTINUE;
        END IF;
        BEGIN
            INSERT INTO outbox (event_id, event_type, tenant_id, payload, headers, occurred_at, publisher)
            VALUES (d.event_id, d.event_type, d.tenant_id, d.payload, d.headers, d.occurred_at, d.publisher)
            ON CONFLICT ON CONSTRAINT outbox_event_id_key DO NOTHING;
            IF NOT FOUND THEN
                outcome := 'skipped';
                reason := 'already_pending';
                detail := 'an event with this id is in the outbox already; the entry stays dead';
                RETURN NEXT;
                CONTINUE;
            END IF;
            UPDATE outbox_dlq x
               SET state = 'replayed', replay_count = x.replay_count + 1, last_replayed_at = now()
             WHERE x.event_id = d.event_id;
            IF forced THEN
                SELECT coalesce(max(v.revision), 0) + 1 INTO rev
                  FROM outbox_dlq_revisions v WHERE v.event_id = d.event_id;
                INSERT INTO outbox_dlq_revisions (event_id, revision, kind, why, detail)
                VALUES (d.event_id, rev, 'forced_replay', p_why,
                        jsonb_build_object('event_time', outbox_event_time(d.event_id, d.occurred_at),
                                           'horizon_days', extract(day FROM horizon)));
            END IF;
        EXCEPTION WHEN OTHERS THEN
            outcome := 'skipped';
            reason := 'insert_failed';
            detail := SQLERRM;
            RETURN NEXT;
            CONTINUE;
        END;
        outcome := 'replayed';
        reason := CASE WHEN forced THEN 'forced_past_horizon' END;
        detail := NULL;
        RETURN NEXT;
    END LOOP;
END
$$;

-- The 0003 replay, for existing callers: the replayed ids of a report.
-- Entries it cannot replay are skipped (and stay dead) instead of failing
-- the whole call; outbox_dlq_replay_report says why.
CREATE OR REPLACE FUNCTION outbox_dlq_replay(
    p_event_type text DEFAULT NULL,
    p_reason text DEFAULT NULL,
    p_from timestamptz DEFAULT NULL,
    p_to timestamptz DEFAULT NULL,
    p_event_id text DEFAULT NULL
) RETURNS SETOF text
LANGUAGE sql SECURITY DEFINER AS $$
    SELECT r.event_id
      FROM outbox_dlq_replay_report(p_event_type => p_event_type, p_reason => p_reason,
                                    p_from => p_from, p_to => p_to, p_event_id => p_event_id) r
     WHERE r.outcome = 'replayed'
$$;

-- ---------------------------------------------------------------------------
-- Repair: replaces a dead entry's payload (and optionally its tenant or
-- headers), records the old and new content with who, when and why, and
-- replays it under the same event id and occurred_at. The catalog's field
-- checks live in the relay's catalog: `outbox-relay dlq repair` runs them
-- before calling this; here the database re-checks what it knows (an
-- object, the partition key, the type and publisher still in the catalog),
-- and the relay checks everything again on publish (a payload that fails
-- there is dead-lettered again, into the same entry). Returns the revision.
CREATE FUNCTION outbox_dlq_repair(
    p_event_id text,
    p_payload jsonb,
    p_why text,
    p_tenant_id text DEFAULT NULL,
    p_headers jsonb DEFAULT NULL,
    p_force boolean DEFAULT false
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    d   outbox_dlq%ROWTYPE;
    c   outbox_catalog%ROWTYPE;
    key jsonb;
    rev integer;
    past_horizon boolean;
BEGIN
    IF p_why IS NULL OR btrim(p_why) = '' THEN
        RAISE EXCEPTION 'a repair needs a reason (p_why): it is kept in outbox_dlq_revisions'
            USING ERRCODE = '22023';
    END IF;
    IF p_event_id IS NULL THEN
        RAISE EXCEPTION 'a repair needs the event id of a dead entry' USING ERRCODE = '22023';
    END IF;
    SELECT * INTO d FROM outbox_dlq x WHERE x.event_id = p_event_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no DLQ entry has event id %', p_event_id
            USING ERRCODE = 'P0002', HINT = 'outbox-relay dlq list shows the dead entries.';
    END IF;
    IF d.state <> 'dead' THEN
        RAISE EXCEPTION 'DLQ entry % is %, not dead: only a dead entry can be repaired', p_event_id, d.state
            USING ERRCODE = '22023';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'the repaired payload of % must be a JSON object, not %', p_event_id,
            coalesce('a JSON ' || jsonb_typeof(p_payload), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF p_headers IS NOT NULL AND jsonb_typeof(p_headers) <> 'object' THEN
        RAISE EXCEPTION 'the repaired headers of % must be a JSON object', p_event_id USING ERRCODE = '22023';
    END IF;
    SELECT * INTO c FROM outbox_catalog x WHERE x.event_type = d.event_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'event type % is not in outbox_catalog: declare it and run `outbox-relay catalog sync` before repairing %',
            d.event_type, p_event_id
            USING ERRCODE = '22023';
    END IF;
    IF d.publisher IS DISTINCT FROM c.publisher THEN
        RAISE EXCEPTION 'publisher % may not publish % (the catalog allows only %): a repair keeps the publisher',
            coalesce(d.publisher, '(none)'), d.event_type, c.publisher
            USING ERRCODE = '22023';
    END IF;
    key := p_payload -> c.partition_key;
    IF key IS NULL OR jsonb_typeof(key) NOT IN ('string', 'number') OR key = '""'::jsonb
       OR (jsonb_typeof(key) = 'number' AND key::text !~ '^-?[0-9]+$') THEN
        RAISE EXCEPTION 'partition key $.% of the repaired payload must be a non-empty string or integer',
            c.partition_key
            USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = p_event_id) THEN
        RAISE EXCEPTION 'event % is in the outbox already: wait until it is published or dead again', p_event_id
            USING ERRCODE = '22023';
    END IF;
    past_horizon := outbox_event_time(d.event_id, d.occurred_at) < now() - outbox_dedupe_horizon();
    IF past_horizon AND NOT coalesce(p_force, false) THEN
        RAISE EXCEPTION 'event % is from %, older than the dedupe horizon (% days): consumers may have forgotten it',
            p_event_id, outbox_event_time(d.event_id, d.occurred_at),
            (SELECT dedupe_horizon_days FROM outbox_config)
            USING ERRCODE = '22023', HINT = 'Force it (--force) to publish it anyway; the force is recorded.';
    END IF;

    SELECT coalesce(max(v.revision), 0) + 1 INTO rev
      FROM outbox_dlq_revisions v WHERE v.event_id = p_event_id;
    INSERT INTO outbox_dlq_revisions (event_id, revision, kind, old_payload, old_tenant_id, old_headers,
                                      new_payload, new_tenant_id, new_headers, why, detail)
    VALUES (p_event_id, rev, 'repair', d.payload, d.tenant_id, d.headers,
            p_payload, coalesce(p_tenant_id, d.tenant_id), coalesce(p_headers, d.headers), p_why,
            jsonb_build_object('reason', d.reason, 'last_error', d.last_error, 'forced', past_horizon));
    UPDATE outbox_dlq x
       SET payload = p_payload,
           tenant_id = coalesce(p_tenant_id, d.tenant_id),
           headers = coalesce(p_headers, d.headers),
           state = 'replayed',
           replay_count = x.replay_count + 1,
           last_replayed_at = now()
     WHERE x.event_id = p_event_id;
    INSERT INTO outbox (event_id, event_type, tenant_id, payload, headers, occurred_at, publisher)
    VALUES (d.event_id, d.event_type, coalesce(p_tenant_id, d.tenant_id), p_payload,
            coalesce(p_headers, d.headers), d.occurred_at, d.publisher);
    RETURN rev;
END
$$;

-- ---------------------------------------------------------------------------
-- processed_event_ids, partitioned by RANGE (event_id): one partition per
-- month of ULID time, so that forgetting dedupe rows older than the horizon
-- is dropping a partition, not a DELETE. A partitioned table's primary key
-- must contain the partition key: (consumer, event_id) does, and keeps
-- enforcing dedupe across partitions because one event id lives in exactly
-- one partition. Ids that are not ULIDs sort above every ULID partition
-- (ULIDs start with 0-7) and land in the DEFAULT partition.
--
-- Existing rows stay where they are: the old table is attached as the
-- partition of the current month, extended down to MINVALUE, instead of
-- being copied (a copy rewrites every row and rebuilds the key; attaching
-- reads the table twice: once to move out the few rows above the month,
-- once to validate the bound). It is dropped as a whole once the current
-- month is older than the horizon. An empty old table (a new install) is
-- simply dropped.

-- Creates the partitions of the months from the current one (or p_from's)
-- to p_months_ahead months later that do not exist yet; returns their
-- names. Rows of such a month already in the DEFAULT partition (a consumer
-- wrote ahead of the partitions, or events of a month older than any
-- partition) move into the new partition, which a purge can then drop. A
-- month that overlaps an existing partition (the one that holds the rows
-- from before partitioning reaches down to MINVALUE) is skipped. Takes SHARE UPDATE
-- EXCLUSIVE on processed_event_ids (dedupe inserts go on) and briefly ACCESS
-- EXCLUSIVE on the DEFAULT partition, only when it creates something.
-- `migrate` creates three months ahead and each relay calls it hourly.
CREATE FUNCTION outbox_dedupe_partitions_ensure(p_months_ahead integer DEFAULT 3,
                                                p_from timestamptz DEFAULT NULL)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    this_month timestamptz := date_trunc('month', coalesce(p_from, now()) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    lo         timestamptz;
    hi         timestamptz;
    part       text;
    -- New tables are created in the outbox's schema, not in the first
    -- entry of the pinned search_path (pg_catalog).
    ns         text := (SELECT c.relnamespace::regnamespace::text FROM pg_class c
                         WHERE c.oid = 'processed_event_ids'::regclass);
BEGIN
    IF p_months_ahead IS NULL OR p_months_ahead NOT BETWEEN 0 AND 120 THEN
        RAISE EXCEPTION 'months ahead must be between 0 and 120, not %', p_months_ahead USING ERRCODE = '22023';
    END IF;
    FOR m IN 0..p_months_ahead LOOP
        lo := this_month + make_interval(months => m);
        hi := lo + interval '1 month';
        part := 'processed_event_ids_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMM');
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        -- Relays call this concurrently: one creates, the others find it.
        PERFORM pg_advisory_xact_lock(hashtext('outbox_dedupe_partitions_ensure'));
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        PERFORM set_config('lock_timeout', '5s', true);
        BEGIN
            EXECUTE format('CREATE TABLE %s.%I (LIKE processed_event_ids INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', ns, part);
            EXECUTE format('ALTER TABLE %I ADD PRIMARY KEY (consumer, event_id)', part);
            EXECUTE format('REVOKE ALL ON %I FROM PUBLIC', part);
            EXECUTE format('WITH moved AS (DELETE FROM processed_event_ids_default WHERE event_id >= %L AND event_id < %L RETURNING *) '
                           'INSERT INTO %I SELECT * FROM moved',
                           outbox_ulid_floor(lo), outbox_ulid_floor(hi), part);
            EXECUTE format('ALTER TABLE processed_event_ids ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           part, outbox_ulid_floor(lo), outbox_ulid_floor(hi));
        EXCEPTION WHEN invalid_object_definition THEN
            -- "would overlap partition ...": everything of this month is undone.
            CONTINUE;
        END;
        EXECUTE format('COMMENT ON TABLE %I IS %L', part,
                       format('Dedupe rows of events from %s (ULID time); dropped by outbox_dedupe_purge '
                              'once older than the dedupe horizon.', to_char(lo AT TIME ZONE 'UTC', 'YYYY-MM')));
        RETURN NEXT part;
    END LOOP;
END
$$;

DO $migration$
DECLARE
    month_start timestamptz := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    bound       text := outbox_ulid_floor(month_start + interval '1 month');
    current     text := 'processed_event_ids_p' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMM');
    has_rows    boolean;
BEGIN
    ALTER TABLE processed_event_ids RENAME TO processed_event_ids_unpartitioned;
    ALTER TABLE processed_event_ids_unpartitioned RENAME CONSTRAINT processed_event_ids_pkey
        TO processed_event_ids_unpartitioned_pkey;
    CREATE TABLE processed_event_ids (
        consumer     text        NOT NULL,
        event_id     text        NOT NULL,
        processed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, event_id)
    ) PARTITION BY RANGE (event_id);
    COMMENT ON TABLE processed_event_ids IS
        'Consumer dedupe, partitioned by month of the event id''s ULID time; see docs/consumer.md.';
    CREATE TABLE processed_event_ids_default PARTITION OF processed_event_ids DEFAULT;
    COMMENT ON TABLE processed_event_ids_default IS
        'Dedupe rows whose event id is not a ULID, or of a month without a partition.';

    has_rows := EXISTS (SELECT 1 FROM processed_event_ids_unpartitioned);
    IF has_rows THEN
        -- Rows the bound below would not admit (ids that are not ULIDs,
        -- ULIDs of a later month) move to the DEFAULT partition first.
        WITH moved AS (
            DELETE FROM processed_event_ids_unpartitioned WHERE event_id >= bound RETURNING *
        )
        INSERT INTO processed_event_ids_default SELECT * FROM moved;
        -- The old table's own policies and grants go: it is reached through
        -- the partitioned table, whose policies apply.
        DROP POLICY own_consumer ON processed_event_ids_unpartitioned;
        DROP POLICY read_all ON processed_event_ids_unpartitioned;
        ALTER TABLE processed_event_ids_unpartitioned DISABLE ROW LEVEL SECURITY;
        REVOKE ALL ON processed_event_ids_unpartitioned FROM PUBLIC, outbox_consumer, outbox_admin;
        EXECUTE format('ALTER TABLE processed_event_ids_unpartitioned RENAME TO %I', current);
        EXECUTE format('ALTER TABLE %I RENAME CONSTRAINT processed_event_ids_unpartitioned_pkey TO %I',
                       current, current || '_pkey');
        EXECUTE format('ALTER TABLE processed_event_ids ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)',
                       current, bound);
        EXECUTE format('COMMENT ON TABLE %I IS %L', current,
                       format('Dedupe rows of events up to %s (ULID time), from before partitioning; dropped '
                              'by outbox_dedupe_purge once older than the dedupe horizon.',
                              to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')));
    ELSE
        DROP TABLE processed_event_ids_unpartitioned;
    END IF;
END
$migration$;

REVOKE ALL ON processed_event_ids, processed_event_ids_default FROM PUBLIC;
GRANT SELECT, INSERT ON processed_event_ids TO outbox_consumer;
GRANT SELECT ON processed_event_ids TO outbox_admin;
-- The policies of 0007, on the partitioned table (queries through it apply
-- them to every partition; partitions themselves grant nothing to anyone).
ALTER TABLE processed_event_ids ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_consumer ON processed_event_ids FOR ALL TO outbox_consumer
    USING (consumer IN (SELECT m.consumer FROM outbox_consumer_roles m WHERE m.role_name = current_user))
    WITH CHECK (consumer IN (SELECT m.consumer FROM outbox_consumer_roles m WHERE m.role_name = current_user));
CREATE POLICY read_all ON processed_event_ids FOR SELECT TO outbox_admin
    USING (true);

SELECT outbox_dedupe_partitions_ensure(3);

-- ---------------------------------------------------------------------------
-- Retention. Each purge is an admin function that reports what it removed.

-- Drops the dedupe partitions whose whole range is older than the horizon
-- (their upper bound's ULID time), and deletes rows of the DEFAULT
-- partition processed longer than the horizon ago. With p_dry_run (the
-- default, and NULL) it only reports. Dropping a partition takes ACCESS
-- EXCLUSIVE on processed_event_ids for an instant; it waits at most 5 s
-- for it and then fails without dropping anything (run it again).
CREATE FUNCTION outbox_dedupe_purge(p_dry_run boolean DEFAULT true)
RETURNS TABLE (partition_name text, events_before timestamptz, action text, rows_removed bigint)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    cutoff timestamptz := now() - outbox_dedupe_horizon();
    dry    boolean := coalesce(p_dry_run, true);
    p      record;
    n      bigint;
BEGIN
    PERFORM set_config('lock_timeout', '5s', true);
    FOR p IN
        SELECT c.relname::text AS name,
               outbox_ulid_time(substring(pg_get_expr(c.relpartbound, c.oid) FROM $re$TO \('([^']*)'\)$re$)) AS upper_time
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'processed_event_ids'::regclass
           AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
         ORDER BY 2
    LOOP
        CONTINUE WHEN p.upper_time IS NULL OR p.upper_time > cutoff;
        partition_name := p.name;
        events_before := p.upper_time;
        EXECUTE format('SELECT count(*) FROM %I', p.name) INTO n;
        rows_removed := n;
        IF dry THEN
            action := 'would drop';
        ELSE
            EXECUTE format('DROP TABLE %I', p.name);
            action := 'dropped';
        END IF;
        RETURN NEXT;
    END LOOP;
    partition_name := 'processed_event_ids_default';
    events_before := cutoff;
    IF dry THEN
        SELECT count(*) INTO n FROM processed_event_ids_default WHERE processed_at < cutoff;
        action := 'would delete';
    ELSE
        DELETE FROM processed_event_ids_default WHERE processed_at < cutoff;
        GET DIAGNOSTICS n = ROW_COUNT;
        action := 'deleted';
    END IF;
    rows_removed := n;
    RETURN NEXT;
END
$$;

-- Deletes replayed and discarded DLQ entries settled (replayed, discarded)
-- longer than p_older_than ago. Dead entries are never deleted. Their
-- revisions go with them only once older than the dedupe horizon: the
-- audit of a money repair outlives its entry as long as the event could
-- come back. Returns how many of each it deleted.
CREATE FUNCTION outbox_dlq_purge(p_older_than interval)
RETURNS TABLE (entries bigint, revisions bigint)
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '1 day' THEN
        RAISE EXCEPTION 'purging DLQ entries needs an age of at least 1 day, not %', p_older_than
            USING ERRCODE = '22023';
    END IF;
    DELETE FROM outbox_dlq d
     WHERE d.state <> 'dead'
       AND coalesce(d.discarded_at, d.last_replayed_at, d.dead_lettered_at) < now() - p_older_than;
    GET DIAGNOSTICS entries = ROW_COUNT;
    DELETE FROM outbox_dlq_revisions v
     WHERE v.made_at < now() - outbox_dedupe_horizon()
       AND NOT EXISTS (SELECT 1 FROM outbox_dlq d WHERE d.event_id = v.event_id);
    GET DIAGNOSTICS revisions = ROW_COUNT;
    RETURN NEXT;
END
$$;

-- Forgets relays that have not reported for p_older_than (at least an
-- hour: a running relay reports every few seconds), stopped cleanly or not.
-- Returns the forgotten relay ids.
CREATE FUNCTION outbox_relays_purge(p_older_than interval DEFAULT interval '7 days')
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '1 hour' THEN
        RAISE EXCEPTION 'forgetting relays needs an age of at least 1 hour, not %: a running relay reports every few seconds',
            p_older_than
            USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    DELETE FROM outbox_relays r WHERE r.heartbeat_at < now() - p_older_than RETURNING r.relay_id;
END
$$;

REVOKE ALL ON FUNCTION
    outbox_dedupe_horizon(), outbox_set_dedupe_horizon(integer),
    outbox_ulid_time(text), outbox_ulid_floor(timestamptz), outbox_event_time(text, timestamptz),
    outbox_dlq_replay_report(text, text, timestamptz, timestamptz, text, boolean, text),
    outbox_dlq_repair(text, jsonb, text, text, jsonb, boolean),
    outbox_dedupe_partitions_ensure(integer, timestamp with time zone), outbox_dedupe_purge(boolean),
    outbox_dlq_purge(interval), outbox_relays_purge(interval)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    outbox_set_dedupe_horizon(integer),
    outbox_dlq_replay_report(text, text, timestamptz, timestamptz, text, boolean, text),
    outbox_dlq_repair(text, jsonb, text, text, jsonb, boolean),
    outbox_dedupe_partitions_ensure(integer, timestamp with time zone), outbox_dedupe_purge(boolean),
    outbox_dlq_purge(interval), outbox_relays_purge(interval)
TO outbox_admin;
-- Relays keep the coming months' partitions created.
GRANT EXECUTE ON FUNCTION outbox_dedupe_partitions_ensure(integer, timestamp with time zone) TO outbox_relay;

SELECT outbox_pin_search_path();
