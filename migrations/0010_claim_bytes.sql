-- Claims are bounded in bytes as well as rows (relay.max_batch_bytes): a
-- claim stops adding rows once the rows it holds reach the budget, so that
-- a few thousand rows of a few megabytes each cannot be loaded at once.
--
-- payload_bytes is the payload's (plus headers') size as the insert trigger
-- sees it, before TOAST compression: the stored size of a compressible
-- 3 MB payload can be a few kilobytes, and the relay loads it whole. Rows
-- inserted before this migration have no value; claims use their stored
-- size instead.
--
-- Safe to apply while relays, writers and consumers of the previous release
-- run: the column is nullable without a default (no table rewrite, a brief
-- exclusive lock, given up after 10 s: run it again), writers cannot set it
-- (no INSERT grant; the trigger overwrites it anyway), and an older relay
-- claims as before.
SET LOCAL lock_timeout = '10s';

ALTER TABLE outbox ADD COLUMN payload_bytes integer;
COMMENT ON COLUMN outbox.payload_bytes IS
    'Uncompressed size of payload and headers, set by the insert trigger; claims stop at relay.max_batch_bytes.';

-- The insert trigger of 0007, plus payload_bytes.
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
    -- The row's size before TOAST compresses it: what a claim loads. Set
    -- on every path, whatever the inserting statement said. A value a
    -- statement copied from another table may still be compressed (and its
    -- stored size a small fraction of what a claim loads): measured as
    -- text then, the expensive way, on that rare path only.
    NEW.payload_bytes :=
        CASE WHEN pg_column_compression(NEW.payload) IS NULL THEN pg_column_size(NEW.payload)
             ELSE octet_length(NEW.payload::text) END
      + CASE WHEN NEW.headers IS NULL THEN 0
             WHEN pg_column_compression(NEW.headers) IS NULL THEN pg_column_size(NEW.headers)
             ELSE octet_length(NEW.headers::text) END;
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

SELECT outbox_pin_search_path();
