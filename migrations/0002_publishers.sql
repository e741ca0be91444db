-- Publisher authorization: the catalog's 403 rules enforced where events are written.
--
-- A writer's identity is its database role, which it cannot forge. The
-- catalog is mirrored into outbox_catalog by `outbox-relay migrate` (and
-- `outbox-relay catalog sync`); admins map login roles to publishers in
-- outbox_publisher_roles. A BEFORE INSERT trigger stamps the publisher and
-- refuses, with SQLSTATE 42501, any event the role may not publish.

CREATE TABLE outbox_catalog (
    event_type     text PRIMARY KEY,
    publisher      text        NOT NULL,
    topic          text        NOT NULL,
    schema_version text        NOT NULL,
    partition_key  text        NOT NULL,
    synced_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE outbox_publisher_roles (
    role_name  name PRIMARY KEY,
    publisher  text        NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE outbox_publisher_roles IS
    'Which catalog publisher each database role writes as; see docs/security.md.';

ALTER TABLE outbox ADD COLUMN publisher text;

CREATE FUNCTION outbox_stamp_publisher() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    expected text;
    actual   text;
BEGIN
    SELECT c.publisher INTO expected FROM outbox_catalog c WHERE c.event_type = NEW.event_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown event type %: not in the event catalog', NEW.event_type
            USING ERRCODE = '22023',
                  HINT = 'Declare it in a catalog file, then run `outbox-relay catalog sync`.';
    END IF;
    SELECT r.publisher INTO actual FROM outbox_publisher_roles r WHERE r.role_name = current_user;
    IF NOT FOUND THEN
        -- The owner of the outbox and superusers can disable this trigger
        -- anyway, so they are trusted: they write as the catalog's publisher
        -- unless they state one (a DLQ replay keeps the original publisher,
        -- which the relay checks again). Services must never run as either.
        IF current_setting('is_superuser') = 'on'
           OR pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'USAGE') THEN
            NEW.publisher := coalesce(NEW.publisher, expected);
            RETURN NEW;
        END IF;
        RAISE EXCEPTION '403 Forbidden: role % has no publisher mapping and may not publish %',
            current_user, NEW.event_type
            USING ERRCODE = '42501',
                  HINT = 'An admin maps it with SELECT outbox_map_publisher(''<role>'', ''<publisher>'').';
    END IF;
    IF actual IS DISTINCT FROM expected THEN
        RAISE EXCEPTION '403 Forbidden: role % (publisher %) may not publish %',
            current_user, actual, NEW.event_type
            USING ERRCODE = '42501',
                  DETAIL = format('The catalog allows only publisher %s to publish %s.', expected, NEW.event_type);
    END IF;
    NEW.publisher := actual;
    RETURN NEW;
END
$$;

CREATE TRIGGER outbox_stamp_publisher
    BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_stamp_publisher();

-- Maps a role to a publisher (admin only). Validated against the catalog
-- mirror so a typo fails here rather than at the first insert.
CREATE FUNCTION outbox_map_publisher(p_role name, p_publisher text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'role % does not exist', p_role USING ERRCODE = '42704';
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

-- Least-privilege group roles. Roles are cluster-wide while grants are per
-- database, so creation tolerates a role that another database already made.
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

REVOKE ALL ON outbox, outbox_dlq, processed_event_ids, outbox_catalog, outbox_publisher_roles FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_map_publisher(name, text) FROM PUBLIC;

-- Writer: insert events, nothing else. It reads the catalog mirror and the
-- role mapping only because the trigger runs with the writer's rights.
GRANT INSERT ON outbox TO outbox_writer;
GRANT SELECT ON outbox_catalog, outbox_publisher_roles TO outbox_writer;

-- Relay: claim, delete and reschedule outbox rows; write the DLQ.
GRANT SELECT, UPDATE, DELETE ON outbox TO outbox_relay;
GRANT SELECT, INSERT, UPDATE ON outbox_dlq TO outbox_relay;
GRANT SELECT ON outbox_catalog, outbox_publisher_roles TO outbox_relay;

-- Admin: the DLQ functions (granted in the DLQ migration), the catalog
-- mirror and the role mapping.
GRANT SELECT ON outbox, outbox_dlq, processed_event_ids TO outbox_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_catalog, outbox_publisher_roles TO outbox_admin;
GRANT EXECUTE ON FUNCTION outbox_map_publisher(name, text) TO outbox_admin;

-- Consumer: the permanent dedupe table only.
GRANT SELECT, INSERT ON processed_event_ids TO outbox_consumer;
