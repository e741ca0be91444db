-- Kafka-side fencing of a lease taken from an owner that stopped renewing.
--
-- A relay hands a message to its producer only while its lease provably
-- holds, but librdkafka may still transmit it up to `message.timeout.ms`
-- later (it expires queued messages before sending them once that time has
-- passed, also after the process was paused). An owner paused right after
-- queueing could therefore deliver stale events of a partition after its
-- lease ran out. The new owner of a lease that *expired* (not one handed
-- back: a relay hands back only after flushing its producer) waits until
-- that window has closed before it publishes the partition:
-- `fenced_ms` is how long from now, given the caller's own
-- `kafka.message_timeout_ms` plus a margin as `p_fence_ms`.
--
-- Safe to apply while relays of the previous release run: this adds an
-- overload; the three-argument function they call is unchanged.
CREATE FUNCTION outbox_lease_acquire(p_relay text, p_ttl_ms integer, p_max integer, p_fence_ms integer)
RETURNS TABLE (vpartition smallint, epoch bigint, fenced_ms integer)
LANGUAGE sql AS $$
    WITH free AS (
        SELECT f.vpartition, f.owner AS old_owner, f.expires_at AS old_expiry
          FROM outbox_leases f
         WHERE f.owner IS NULL OR f.expires_at <= now()
         ORDER BY f.vpartition
         LIMIT greatest(p_max, 0)
           FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox_leases l
       SET owner = p_relay,
           epoch = l.epoch + 1,
           expires_at = now() + make_interval(secs => p_ttl_ms / 1000.0),
           acquired_at = now()
      FROM free
     WHERE l.vpartition = free.vpartition
    RETURNING l.vpartition, l.epoch,
        CASE WHEN free.old_owner IS NULL OR free.old_owner = p_relay OR free.old_expiry = '-infinity'
             THEN 0
             ELSE greatest(0, ceil(1000 * extract(epoch FROM
                      free.old_expiry + make_interval(secs => greatest(p_fence_ms, 0) / 1000.0)
                      - clock_timestamp())))::integer
        END
$$;

REVOKE ALL ON FUNCTION outbox_lease_acquire(text, integer, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_lease_acquire(text, integer, integer, integer) TO outbox_relay;

SELECT outbox_pin_search_path();
