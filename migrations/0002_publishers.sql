-- Publisher authorization: the catalog's 403 rules enforced where events are
-- written, and the least-privilege group roles. See docs/security.md.
--
-- A writer's identity is its database role, which it cannot forge. The
-- catalog is mirrored into outbox_catalog by `outbox-relay migrate` (and
-- `outbox-relay catalog sync`); admins map login roles to publishers with
-- outbox_map_publisher(). A BEFORE INSERT trigger stamps the publisher and
-- refuses, with SQLSTATE 42501, any event the role may not publish.

CREATE TABLE outbox_catalog (
    event_type     text PRIMARY KEY,
    publisher      text        NOT NULL,
    topic          text        NOT NULL,
    schema_version text        NOT NULL,
    partition_key  text        NOT NULL,
    -- outbox_config.vpartitions, copied here so that the insert trigger
    -- needs a single lookup.
    vpartitions    integer     NOT NULL,
    synced_at      timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE outbox_catalog IS
    'Mirror of the event catalog (outbox-relay catalog sync); the publisher trigger reads it.';

CREATE TABLE outbox_publisher_roles (
    role_name  name PRIMARY KEY,
    publisher  text        NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE outbox_publisher_roles IS
    'Which catalog publisher each database login role writes as; see docs/security.md.';

-- Stamped by the trigger below; a writer role has no privilege on it.
ALTER TABLE outbox ADD COLUMN publisher text;

-- Runs on every writer's insert, so it does one index lookup (catalog entry
-- and role mapping together) and returns on the first test in the common case.
--
-- It runs with the writer's rights, and an unqualified table name would
-- resolve to a writer's temporary table first (pg_temp is searched before
-- everything unless named): a writer could shadow the role mapping, the
-- catalog or pg_class and pass as any publisher. Every relation is therefore
-- schema-qualified, with this migration's schema filled in below. (A
-- `SET search_path` clause would do the same but costs a configuration
-- change on every call.)
DO $migration$
BEGIN
    EXECUTE replace($function$
CREATE FUNCTION outbox_stamp_publisher() RETURNS trigger
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

CREATE TRIGGER outbox_stamp_publisher
    BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_stamp_publisher();

-- Maps a login role to a publisher (admin only). Validated against the
-- catalog mirror so a typo fails here rather than at the first insert.
-- A role with members is refused: every member could SET ROLE to it and
-- publish as that publisher.
CREATE FUNCTION outbox_map_publisher(p_role name, p_publisher text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    members text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'role % does not exist', p_role USING ERRCODE = '42704';
    END IF;
    SELECT string_agg(m.rolname, ', ' ORDER BY m.rolname) INTO members
      FROM pg_auth_members a
      JOIN pg_roles g ON g.oid = a.roleid
      JOIN pg_roles m ON m.oid = a.member
     WHERE g.rolname = p_role;
    IF members IS NOT NULL THEN
        RAISE EXCEPTION 'role % has members (%), who could act as it: map each service''s login role instead',
            p_role, members
            USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM outbox_catalog WHERE publisher = p_publisher) THEN
        RAISE EXCEPTION 'publisher % publishes no event of the catalog', p_publisher
            USING ERRCODE = '22023',
                  HINT = 'Check the name against `outbox-relay catalog list`, or run `outbox-relay catalog sync`.';
    END IF;
    INSERT INTO outbox_publisher_roles (role_name, publisher) VALUES (p_role, p_publisher)
    ON CONFLICT (role_name) DO UPDATE SET publisher = EXCLUDED.publisher, granted_at = now();
END
$$;

-- Consumer side: events the consumer kit gave up on after its configured
-- number of attempts (src/consumer.rs, docs/consumer.md). They are not in
-- processed_event_ids, so a redelivery or a replay runs the handler again.
CREATE TABLE consumer_parked_events (
    consumer    text        NOT NULL,
    event_id    text        NOT NULL,
    event_type  text        NOT NULL,
    topic       text        NOT NULL,
    "partition" integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    -- The envelope as received.
    envelope    jsonb       NOT NULL,
    last_error  text        NOT NULL,
    attempts    integer     NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Least-privilege group roles. Roles are cluster-wide while grants are per
-- database, so creation tolerates a role that another database's migration
-- made, even concurrently.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['outbox_writer', 'outbox_relay', 'outbox_admin', 'outbox_consumer'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

REVOKE ALL ON outbox, outbox_dlq, processed_event_ids, outbox_catalog, outbox_publisher_roles,
              consumer_parked_events, outbox_config FROM PUBLIC;
-- The lease task reads the partition count; catalog sync copies it.
GRANT SELECT ON outbox_config TO outbox_relay, outbox_admin;
REVOKE ALL ON FUNCTION outbox_map_publisher(name, text) FROM PUBLIC;

-- Writer: insert events, nothing else. No SELECT, UPDATE or DELETE on any
-- event (its own included), and only the columns an event is made of: not
-- the ordering id (no jumping the queue), not the publisher, not the retry
-- bookkeeping. It reads the catalog mirror and the role mapping only because
-- the trigger runs with the writer's rights.
GRANT INSERT (event_id, event_type, tenant_id, payload, headers, occurred_at) ON outbox TO outbox_writer;
GRANT SELECT ON outbox_catalog, outbox_publisher_roles TO outbox_writer;

-- Relay: claim, delete and reschedule outbox rows (the retry bookkeeping
-- columns only: it cannot rewrite an event or its publisher); write the DLQ.
GRANT SELECT, DELETE ON outbox TO outbox_relay;
GRANT UPDATE (attempts, last_error, first_failed_at, available_at) ON outbox TO outbox_relay;
GRANT SELECT, INSERT, UPDATE ON outbox_dlq TO outbox_relay;

-- Admin: the DLQ functions (granted in the DLQ migration), the catalog
-- mirror and the role mapping, and reading everything.
GRANT SELECT ON outbox, outbox_dlq, processed_event_ids, consumer_parked_events TO outbox_admin;
GRANT DELETE ON consumer_parked_events TO outbox_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_catalog, outbox_publisher_roles TO outbox_admin;
GRANT EXECUTE ON FUNCTION outbox_map_publisher(name, text) TO outbox_admin;

-- Consumer: the permanent dedupe table and its parked events only.
GRANT SELECT, INSERT ON processed_event_ids TO outbox_consumer;
GRANT SELECT, INSERT, UPDATE ON consumer_parked_events TO outbox_consumer;
