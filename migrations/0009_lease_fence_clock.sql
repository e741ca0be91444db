-- The lease fence compares expiry with the clock at the time of the check,
-- not with the start of the batch's transaction (now()): a batch settles
-- long after it began (it waits for Kafka), and a lease that ran out in
-- between must not pass the fence. Safe while relays run: the function is
-- replaced in place, with the same signature and grants.
CREATE OR REPLACE FUNCTION outbox_lease_fence(p_relay text, p_vpartitions smallint[], p_epochs bigint[])
RETURNS SETOF smallint
LANGUAGE sql VOLATILE AS $$
    SELECT l.vpartition
      FROM outbox_leases l
      JOIN unnest(p_vpartitions, p_epochs) AS e(vp, epoch) ON e.vp = l.vpartition
     WHERE l.owner = p_relay AND l.epoch = e.epoch AND l.expires_at > clock_timestamp()
$$;

SELECT outbox_pin_search_path();
