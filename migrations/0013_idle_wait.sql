-- An idle relay waits for new rows inside PostgreSQL.
--
-- With an empty outbox a relay used to claim every `relay.idle_interval_ms`
-- (5 ms): a transaction, the claim statement and a rollback, three round
-- trips and two process wake-ups 200 times a second, about 12 % of a core
-- between the relay and its session for nothing. Now, after an empty claim,
-- the relay calls outbox_wait_due once: the server looks for a row every
-- p_every_ms and answers as soon as one is there, or after p_wait_ms with
-- false. The relay then claims (or calls again).
--
-- The probe asks only whether the outbox holds a fresh row (any partition)
-- or a retried row that is due: two index lookups that stop at the first
-- entry. It may say true when the claim then finds nothing for this relay
-- (rows of partitions leased by another relay, rows another relay has
-- locked): the relay then waits its idle interval before asking again, as
-- it polled before.
--
-- Right after a large drain those lookups step over many dead index
-- entries until autovacuum removes them, so the table is not read on every
-- look: between looks the function reads the outbox's id sequence, which
-- moves whenever a writer inserts (non-transactionally, before the row
-- commits). It reads the table on its first look, on every look within
-- 100 ms of the sequence moving (the row may commit a little after its id
-- was taken; a transaction that commits later still is seen by the next
-- periodic look) and on every tenth look otherwise (retried rows coming
-- due, rows inserted with an explicit id). It runs as the outbox's owner
-- (SECURITY DEFINER, search_path pinned) because reading the sequence
-- needs a privilege the relay has no other use for; it returns one
-- boolean.
--
-- Each look runs under its own snapshot (a volatile function in READ
-- COMMITTED), so a row committed during the wait is seen by the next look.
-- `now()` is the call's start, so due times are compared with the clock.
--
-- Safe to apply while relays of the previous release run: they do not call
-- it.
CREATE FUNCTION outbox_wait_due(p_wait_ms integer, p_every_ms integer)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    -- Bounded on the server too: a caller cannot hold a session for long,
    -- nor spin it.
    deadline   timestamptz := clock_timestamp()
        + make_interval(secs => least(greatest(p_wait_ms, 0), 10000) / 1000.0);
    pause      double precision := least(greatest(p_every_ms, 1), 1000) / 1000.0;
    ids        regclass := pg_get_serial_sequence('outbox', 'id')::regclass;
    looked_at  timestamptz;
    taken      bigint;
    seen       bigint;
    taken_at   timestamptz := '-infinity';
    looks      integer := 0;
BEGIN
    LOOP
        looked_at := clock_timestamp();
        taken := coalesce(pg_sequence_last_value(ids), 0);
        IF seen IS NOT NULL AND taken <> seen THEN
            taken_at := looked_at;
        END IF;
        seen := taken;
        -- The table is read on the first look, every tenth, and on every
        -- look within 100 ms of a writer taking a new id (its row may
        -- commit a little after the id was taken). A variable, not
        -- clock_timestamp() itself: only a stable value can bound the
        -- index scan.
        IF looks % 10 = 0 OR taken_at > looked_at - interval '100 milliseconds' THEN
            IF EXISTS (SELECT 1 FROM outbox WHERE id > 0)
               OR EXISTS (SELECT 1 FROM outbox WHERE id < 0 AND available_at <= looked_at) THEN
                RETURN true;
            END IF;
        END IF;
        looks := looks + 1;
        IF looked_at >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(pause);
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION outbox_wait_due(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_wait_due(integer, integer) TO outbox_relay;

SELECT outbox_pin_search_path();
