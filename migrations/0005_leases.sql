-- Virtual partitions and leases: several relays share one outbox without
-- two of them ever publishing the same partition at once.
--
-- Every row carries a virtual partition computed at insert from its
-- partition key (the catalog's key field), so plain-SQL writers need not
-- compute it. A relay publishes only the partitions it holds a lease on;
-- each lease has an epoch that grows on every change of owner, and the relay
-- presents it when it settles a batch (fencing).

CREATE TABLE outbox_config (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Fixed at install: changing it would move keys between partitions
    -- while rows are pending. See docs/scaling.md before choosing.
    vpartitions integer NOT NULL CHECK (vpartitions BETWEEN 1 AND 4096)
);
INSERT INTO outbox_config (vpartitions)
VALUES (coalesce(nullif(current_setting('outbox.vpartitions', true), '')::integer, 256));

-- Stable within a PostgreSQL major version; only pending rows depend on it.
CREATE FUNCTION outbox_vpartition(p_key text, p_count integer) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ((hashtextextended(coalesce(p_key, ''), 0) & 9223372036854775807) % p_count)::smallint
$$;

ALTER TABLE outbox ADD COLUMN vpartition smallint NOT NULL DEFAULT 0;
ALTER TABLE outbox_dlq ADD COLUMN vpartition smallint;
-- The partition count travels with the catalog mirror so that the insert
-- trigger needs one lookup for publisher, key field and count.
ALTER TABLE outbox_catalog ADD COLUMN vpartitions integer NOT NULL
    DEFAULT 256;
UPDATE outbox_catalog SET vpartitions = (SELECT vpartitions FROM outbox_config);
ALTER TABLE outbox_catalog ALTER COLUMN vpartitions
    SET DEFAULT 256;

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

-- The leases still held under the presented epochs, locked against a change
-- of owner until the settling transaction ends.
CREATE FUNCTION outbox_lease_fence(p_relay text, p_vpartitions smallint[], p_epochs bigint[])
RETURNS SETOF smallint
LANGUAGE sql AS $$
    SELECT l.vpartition
      FROM outbox_leases l
      JOIN unnest(p_vpartitions, p_epochs) AS e(vp, epoch) ON e.vp = l.vpartition
     WHERE l.owner = p_relay AND l.epoch = e.epoch AND l.expires_at > now()
       FOR SHARE OF l
$$;

CREATE VIEW outbox_lease_summary AS
SELECT coalesce(owner, '(none)') AS owner,
       count(*) FILTER (WHERE expires_at > now()) AS live,
       count(*) FILTER (WHERE expires_at <= now()) AS expired,
       min(expires_at) AS next_expiry
  FROM outbox_leases
 GROUP BY 1;

REVOKE ALL ON outbox_config, outbox_leases, outbox_lease_summary FROM PUBLIC;
GRANT SELECT ON outbox_config TO outbox_writer, outbox_relay, outbox_admin;
GRANT SELECT, UPDATE ON outbox_leases TO outbox_relay;
GRANT SELECT ON outbox_leases, outbox_lease_summary TO outbox_admin;

CREATE FUNCTION outbox_assign_vpartition() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    key_field text;
    n         integer;
BEGIN
    SELECT c.partition_key, c.vpartitions INTO key_field, n
      FROM outbox_catalog c WHERE c.event_type = NEW.event_type;
    -- An unknown type is refused by outbox_stamp_publisher, which runs next.
    IF FOUND THEN
        NEW.vpartition := outbox_vpartition(NEW.payload ->> key_field, n);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER outbox_assign_vpartition
    BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_assign_vpartition();
