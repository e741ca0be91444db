-- Virtual partitions and leases: several relays share one outbox without
-- two of them ever publishing the same partition at once.
--
-- Every row carries a virtual partition computed at insert from its
-- partition key (0001, 0002). A relay publishes only the partitions it holds a lease on;
-- each lease has an epoch that grows on every change of owner, and the relay
-- presents it when it settles a batch (fencing).

CREATE TABLE outbox_leases (
    vpartition  smallint PRIMARY KEY,
    owner       text,
    epoch       bigint      NOT NULL DEFAULT 0,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity',
    acquired_at timestamptz
);
INSERT INTO outbox_leases (vpartition)
SELECT g FROM generate_series(0, (SELECT vpartitions FROM outbox_config) - 1) AS g;

-- Renews the leases this relay still holds (an expired one is not renewed:
-- it must be acquired again, under a new epoch).
CREATE FUNCTION outbox_lease_renew(p_relay text, p_ttl_ms integer)
RETURNS TABLE (vpartition smallint, epoch bigint)
LANGUAGE sql AS $$
    UPDATE outbox_leases l
       SET expires_at = now() + make_interval(secs => p_ttl_ms / 1000.0)
     WHERE l.owner = p_relay AND l.expires_at > now()
    RETURNING l.vpartition, l.epoch
$$;

-- Takes up to p_max free or expired partitions, each under a new epoch.
CREATE FUNCTION outbox_lease_acquire(p_relay text, p_ttl_ms integer, p_max integer)
RETURNS TABLE (vpartition smallint, epoch bigint)
LANGUAGE sql AS $$
    WITH free AS (
        SELECT f.vpartition
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
    RETURNING l.vpartition, l.epoch
$$;

-- Hands partitions back at once (draining handoff): another relay can take
-- them on its next renewal instead of waiting for expiry.
CREATE FUNCTION outbox_lease_release(p_relay text, p_vpartitions smallint[])
RETURNS integer
LANGUAGE sql AS $$
    WITH released AS (
        UPDATE outbox_leases l
           SET owner = NULL, expires_at = '-infinity'
         WHERE l.owner = p_relay AND l.vpartition = ANY(p_vpartitions)
        RETURNING 1
    )
    SELECT count(*)::integer FROM released
$$;

-- The leases still held under the presented epochs. A relay commits a
-- batch only if every partition it touched is still its own: one that lost
-- a lease (paused, partitioned away) gives its rows back instead. No lock is
-- needed for safety: the batch's rows stay locked by its transaction, so a
-- new owner cannot claim them until it ends, and finds them gone if it
-- committed.
CREATE FUNCTION outbox_lease_fence(p_relay text, p_vpartitions smallint[], p_epochs bigint[])
RETURNS SETOF smallint
LANGUAGE sql STABLE AS $$
    SELECT l.vpartition
      FROM outbox_leases l
      JOIN unnest(p_vpartitions, p_epochs) AS e(vp, epoch) ON e.vp = l.vpartition
     WHERE l.owner = p_relay AND l.epoch = e.epoch AND l.expires_at > now()
$$;

CREATE VIEW outbox_lease_summary AS
SELECT coalesce(owner, '(none)') AS owner,
       count(*) FILTER (WHERE expires_at > now()) AS live,
       count(*) FILTER (WHERE expires_at <= now()) AS expired,
       min(expires_at) AS next_expiry
  FROM outbox_leases
 GROUP BY 1;

REVOKE ALL ON outbox_leases, outbox_lease_summary FROM PUBLIC;
GRANT SELECT, UPDATE ON outbox_leases TO outbox_relay;
GRANT SELECT ON outbox_leases, outbox_lease_summary TO outbox_admin;
