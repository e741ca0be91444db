-- Least privilege, as deployed: every group role holds exactly what its
-- code path executes, and nothing a hostile member could turn against
-- another role. docs/security.md shows the resulting matrix;
-- src/privileges.rs declares it and tests/security.rs checks it both against
-- the catalog and by attempting every operation.
--
-- Safe to apply while relays, writers and consumers of the previous release
-- run, with one exception that the upgrade runbook spells out: a consumer
-- login role must be mapped to its consumer name (outbox_map_consumer) to
-- keep writing its dedupe rows; until then its inserts are refused and the
-- consumer kit retries them (nothing is lost, the consumer pauses).

-- Enabling row security takes an exclusive lock on the mapping, dedupe and
-- parked tables; every writer's insert reads the publisher mapping. Rather
-- than wait behind a long transaction with writers queued behind it, the
-- migration gives up (and rolls back whole) after 10 s: run it again.
SET LOCAL lock_timeout = '10s';

-- The retry bookkeeping column added by 0003 after 0002 granted the others:
-- without it the relay's outbox_schedule_retry fails with 42501 on the first
-- transient publish failure.
GRANT UPDATE (unknown_failures) ON outbox TO outbox_relay;

-- Functions run with a pinned search_path. A function that runs with its
-- caller's rights (the insert trigger runs as the writer) otherwise resolves
-- unqualified functions, operators and types through the caller's
-- search_path: a writer owning a schema could put its own pg_has_role() or
-- `=` ahead of pg_catalog's and pass as another publisher, or shadow the hash
-- behind the virtual partition. pg_temp comes last so that no temporary
-- object shadows anything either. Every later migration calls this again.
--
-- Two functions are left unpinned, because a pinned function costs a
-- configuration change on every call and these run on every writer's insert
-- (measured: pinning them doubled the trigger's time per row):
--  * outbox_vpartition: a one-expression SQL function that the trigger
--    inlines while the trigger's own pinned search_path is in force, so the
--    writer's path never reaches it. Called directly, it answers only the
--    caller.
--  * outbox_ulid: the event id default. A writer that shadows what it calls
--    only changes its own event's id, which it may set anyway; the id's
--    format is a CHECK constraint.
CREATE OR REPLACE FUNCTION outbox_pin_search_path() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    -- The outbox's schema, found through the table rather than
    -- current_schema(): once this function is pinned too, its own first
    -- search_path entry is pg_catalog.
    ns oid := (SELECT c.relnamespace FROM pg_catalog.pg_class c WHERE c.oid = 'outbox_config'::regclass);
    f  regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = ns
           AND p.proname LIKE 'outbox%'
           AND p.proname NOT IN ('outbox_vpartition', 'outbox_ulid')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f,
                       (SELECT n.nspname FROM pg_catalog.pg_namespace n WHERE n.oid = ns));
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION outbox_pin_search_path() FROM PUBLIC;

-- The insert trigger, as in 0002, plus: a payload must be a JSON object (the
-- envelope's `data`, and what the catalog's field checks read), refused here
-- with a clear error instead of in the DLQ later. The owner's path (DLQ
-- replays) is unchanged so that a replay of an old entry is never refused.
DO $migration$
BEGIN
    EXECUTE replace($function$
CREATE OR REPLACE FUNCTION outbox_stamp_publisher() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    expected  text;
    actual    text;
    key_field text;
    n         integer;
BEGIN
    SELECT c.publisher, r.publisher, c.partition_key, c.vpartitions INTO expected, actual, key_field, n
      FROM @schema@.outbox_catalog c
      LEFT JOIN @schema@.outbox_publisher_roles r ON r.role_name = current_user
     WHERE c.event_type = NEW.event_type;
    IF actual = expected THEN
        IF jsonb_typeof(NEW.payload) <> 'object' THEN
            RAISE EXCEPTION 'payload of % must be a JSON object, not a JSON %',
                NEW.event_type, jsonb_typeof(NEW.payload)
                USING ERRCODE = '22023',
                      HINT = 'The payload is the envelope''s data: an object with the catalog''s fields.';
        END IF;
        NEW.publisher := actual;
        NEW.vpartition := @schema@.outbox_vpartition(NEW.payload ->> key_field, n);
        RETURN NEW;
    END IF;
    IF expected IS NULL THEN
        RAISE EXCEPTION 'unknown event type %: not in the event catalog', NEW.event_type
            USING ERRCODE = '22023',
                  HINT = 'Declare it in a catalog file, then run `outbox-relay catalog sync`.';
    END IF;
    IF actual IS NULL THEN
        -- The owner of the outbox and superusers can disable this trigger
        -- anyway, so they are trusted: they write as the catalog's publisher
        -- unless they state one (a DLQ replay keeps the original publisher,
        -- which the relay checks again). Services must never run as either.
        IF current_setting('is_superuser') = 'on'
           OR pg_has_role(current_user,
                          (SELECT relowner FROM pg_catalog.pg_class WHERE oid = TG_RELID), 'USAGE') THEN
            NEW.publisher := coalesce(NEW.publisher, expected);
            NEW.vpartition := @schema@.outbox_vpartition(NEW.payload ->> key_field, n);
            RETURN NEW;
        END IF;
        RAISE EXCEPTION '403 Forbidden: role % has no publisher mapping and may not publish %',
            current_user, NEW.event_type
            USING ERRCODE = '42501',
                  HINT = 'An admin maps it with SELECT outbox_map_publisher(''<role>'', ''<publisher>'').';
    END IF;
    RAISE EXCEPTION '403 Forbidden: role % (publisher %) may not publish %',
        current_user, actual, NEW.event_type
        USING ERRCODE = '42501',
              DETAIL = format('The catalog allows only publisher %s to publish %s.', expected, NEW.event_type);
END
$$
$function$, '@schema@', quote_ident(current_schema()));
END
$migration$;

COMMENT ON COLUMN outbox.event_id IS
    'Stable envelope id. A writer may supply it and make a retried insert idempotent with '
    'INSERT ... ON CONFLICT DO NOTHING (no conflict target: naming one needs SELECT, which writers do not have).';

-- Writers read the role mapping only because the trigger runs with their
-- rights; each sees its own mapping row and nobody else's.
ALTER TABLE outbox_publisher_roles ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_mapping ON outbox_publisher_roles FOR SELECT TO outbox_writer
    USING (role_name = current_user);
CREATE POLICY administer ON outbox_publisher_roles FOR ALL TO outbox_admin
    USING (true) WITH CHECK (true);

-- Consumers: which login role consumes as which consumer name (the dedupe
-- scope, ConsumerSettings::name). A consumer role reads and writes only the
-- dedupe and parked rows of the names it is mapped to: the money ledger's
-- dedupe rows cannot be forged or read by any other module.
CREATE TABLE outbox_consumer_roles (
    role_name  name        NOT NULL,
    consumer   text        NOT NULL CHECK (btrim(consumer) <> ''),
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role_name, consumer)
);
COMMENT ON TABLE outbox_consumer_roles IS
    'Which consumer names each consumer login role may act as; see docs/security.md.';
REVOKE ALL ON outbox_consumer_roles FROM PUBLIC;
ALTER TABLE outbox_consumer_roles ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_mapping ON outbox_consumer_roles FOR SELECT TO outbox_consumer
    USING (role_name = current_user);
CREATE POLICY administer ON outbox_consumer_roles FOR ALL TO outbox_admin
    USING (true) WITH CHECK (true);
GRANT SELECT ON outbox_consumer_roles TO outbox_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_consumer_roles TO outbox_admin;

-- Maps a consumer login role to a consumer name (admin only). As for
-- publishers, a role with members is refused: each member could act as it.
CREATE FUNCTION outbox_map_consumer(p_role name, p_consumer text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    members text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'role % does not exist', p_role USING ERRCODE = '42704';
    END IF;
    IF p_consumer IS NULL OR btrim(p_consumer) = '' THEN
        RAISE EXCEPTION 'a consumer name is needed (the consumer kit''s ConsumerSettings::name)'
            USING ERRCODE = '22023';
    END IF;
    SELECT string_agg(m.rolname, ', ' ORDER BY m.rolname) INTO members
      FROM pg_auth_members a
      JOIN pg_roles g ON g.oid = a.roleid
      JOIN pg_roles m ON m.oid = a.member
     WHERE g.rolname = p_role;
    IF members IS NOT NULL THEN
        RAISE EXCEPTION 'role % has members (%), who could act as it: map each consumer''s login role instead',
            p_role, members
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO outbox_consumer_roles (role_name, consumer) VALUES (p_role, p_consumer)
    ON CONFLICT DO NOTHING;
END
$$;

-- The consumer names the current role may act as. A policy calls it once
-- per statement (it is STABLE and has no arguments).
ALTER TABLE processed_event_ids ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_consumer ON processed_event_ids FOR ALL TO outbox_consumer
    USING (consumer IN (SELECT m.consumer FROM outbox_consumer_roles m WHERE m.role_name = current_user))
    WITH CHECK (consumer IN (SELECT m.consumer FROM outbox_consumer_roles m WHERE m.role_name = current_user));
CREATE POLICY read_all ON processed_event_ids FOR SELECT TO outbox_admin
    USING (true);

ALTER TABLE consumer_parked_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_consumer ON consumer_parked_events FOR ALL TO outbox_consumer
    USING (consumer IN (SELECT m.consumer FROM outbox_consumer_roles m WHERE m.role_name = current_user))
    WITH CHECK (consumer IN (SELECT m.consumer FROM outbox_consumer_roles m WHERE m.role_name = current_user));
CREATE POLICY read_all ON consumer_parked_events FOR SELECT TO outbox_admin
    USING (true);
CREATE POLICY remove ON consumer_parked_events FOR DELETE TO outbox_admin
    USING (true);

-- Functions are executable by PUBLIC unless revoked. Each one now goes to the
-- group whose path calls it, and to nobody else.
REVOKE ALL ON FUNCTION
    outbox_ulid(), outbox_vpartition(text, integer), outbox_stamp_publisher(),
    outbox_retry_delay(integer, bigint, bigint, float8),
    outbox_lease_renew(text, integer), outbox_lease_acquire(text, integer, integer),
    outbox_lease_release(text, smallint[]), outbox_lease_fence(text, smallint[], bigint[]),
    outbox_notify(), outbox_map_consumer(name, text)
FROM PUBLIC;
-- The writer's insert evaluates the event id default and the trigger's
-- partition function with the writer's rights.
GRANT EXECUTE ON FUNCTION outbox_ulid(), outbox_vpartition(text, integer) TO outbox_writer;
GRANT EXECUTE ON FUNCTION
    outbox_retry_delay(integer, bigint, bigint, float8),
    outbox_lease_renew(text, integer), outbox_lease_acquire(text, integer, integer),
    outbox_lease_release(text, smallint[]), outbox_lease_fence(text, smallint[], bigint[])
TO outbox_relay;
GRANT EXECUTE ON FUNCTION outbox_map_consumer(name, text) TO outbox_admin;

-- `outbox-relay migrate --dry-run` and the relay's start-up compare the
-- applied migrations with the binary's. psql-applied schemas (scripts) have
-- no such table.
DO $$
BEGIN
    IF to_regclass('_sqlx_migrations') IS NOT NULL THEN
        REVOKE ALL ON _sqlx_migrations FROM PUBLIC;
        GRANT SELECT ON _sqlx_migrations TO outbox_relay, outbox_admin;
    END IF;
END
$$;

SELECT outbox_pin_search_path();
ALTER FUNCTION outbox_vpartition(text, integer) RESET search_path;
ALTER FUNCTION outbox_ulid() RESET search_path;
