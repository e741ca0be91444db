-- Optional low-latency wake-ups (off by default).
--
-- A statement-level trigger sends one notification per inserting statement;
-- PostgreSQL folds identical notifications of one transaction into one, so
-- a burst of writes in a transaction costs a single notification. It is
-- still not free: delivering notifications serializes committing writers
-- on a cluster-wide lock, which is why it is off unless an admin turns it
-- on (see docs/scaling.md for the measured cost). Relays with
-- `relay.listen = true` LISTEN and wake at once; without the trigger they
-- poll every `relay.idle_interval_ms`.

CREATE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_relay', '');
    RETURN NULL;
END
$$;

CREATE FUNCTION outbox_enable_notify() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'outbox_notify' AND tgrelid = 'outbox'::regclass) THEN
        CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
            FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
    END IF;
END
$$;

CREATE FUNCTION outbox_disable_notify() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    DROP TRIGGER IF EXISTS outbox_notify ON outbox;
END
$$;

REVOKE ALL ON FUNCTION outbox_enable_notify(), outbox_disable_notify() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_enable_notify(), outbox_disable_notify() TO outbox_admin;

SELECT outbox_pin_search_path();
