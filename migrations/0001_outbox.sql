-- Core tables of the transactional outbox.
--
-- A kernel service writes an event with nothing more than
--   INSERT INTO outbox (event_type, tenant_id, payload) VALUES (...);
-- inside its own transaction. Every other column has a default.

-- Lowercase Crockford base32 ULID (48-bit millisecond time + 80 random bits),
-- the same spelling as the event catalog's example ids. It runs on every
-- writer's insert, so it is one expression over three integers: about 5 µs,
-- against 15 µs for a set-returning formulation.
CREATE FUNCTION outbox_ulid() RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL SAFE AS $$
DECLARE
    a  constant text := '0123456789abcdefghjkmnpqrstvwxyz';
    t  bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    r1 bigint := (random() * 1099511627775)::bigint;
    r2 bigint := (random() * 1099511627775)::bigint;
BEGIN
    RETURN substr(a, ((t >> 45) & 31)::int + 1, 1) || substr(a, ((t >> 40) & 31)::int + 1, 1)
        || substr(a, ((t >> 35) & 31)::int + 1, 1) || substr(a, ((t >> 30) & 31)::int + 1, 1)
        || substr(a, ((t >> 25) & 31)::int + 1, 1) || substr(a, ((t >> 20) & 31)::int + 1, 1)
        || substr(a, ((t >> 15) & 31)::int + 1, 1) || substr(a, ((t >> 10) & 31)::int + 1, 1)
        || substr(a, ((t >> 5) & 31)::int + 1, 1) || substr(a, (t & 31)::int + 1, 1)
        || substr(a, ((r1 >> 35) & 31)::int + 1, 1) || substr(a, ((r1 >> 30) & 31)::int + 1, 1)
        || substr(a, ((r1 >> 25) & 31)::int + 1, 1) || substr(a, ((r1 >> 20) & 31)::int + 1, 1)
        || substr(a, ((r1 >> 15) & 31)::int + 1, 1) || substr(a, ((r1 >> 10) & 31)::int + 1, 1)
        || substr(a, ((r1 >> 5) & 31)::int + 1, 1) || substr(a, (r1 & 31)::int + 1, 1)
        || substr(a, ((r2 >> 35) & 31)::int + 1, 1) || substr(a, ((r2 >> 30) & 31)::int + 1, 1)
        || substr(a, ((r2 >> 25) & 31)::int + 1, 1) || substr(a, ((r2 >> 20) & 31)::int + 1, 1)
        || substr(a, ((r2 >> 15) & 31)::int + 1, 1) || substr(a, ((r2 >> 10) & 31)::int + 1, 1)
        || substr(a, ((r2 >> 5) & 31)::int + 1, 1) || substr(a, (r2 & 31)::int + 1, 1);
END
$$;

-- Virtual partitions: every row is assigned one from its partition key, so
-- that several relays can share the outbox without reordering a key (see
-- docs/scaling.md). The count is fixed at install: changing it would move
-- keys between partitions while rows are pending. `outbox-relay migrate`
-- passes `leases.vpartitions` through the `outbox.vpartitions` setting.
CREATE TABLE outbox_config (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    vpartitions integer NOT NULL CHECK (vpartitions BETWEEN 1 AND 4096)
);
INSERT INTO outbox_config (vpartitions)
VALUES (coalesce(nullif(current_setting('outbox.vpartitions', true), '')::integer, 256));

-- Stable within a PostgreSQL major version; only pending rows depend on it.
CREATE FUNCTION outbox_vpartition(p_key text, p_count integer) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ((hashtextextended(coalesce(p_key, ''), 0) & 9223372036854775807) % p_count)::smallint
$$;

CREATE TABLE outbox (
    -- Ordering id: the relay publishes in this order. GENERATED ALWAYS so that
    -- no writer can jump the queue.
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Stable envelope id: every redelivery and replay carries the same one.
    -- A writer may supply it (INSERT ... ON CONFLICT (event_id) DO NOTHING) so
    -- that retrying its own insert is idempotent.
    event_id        text        NOT NULL DEFAULT outbox_ulid(),
    event_type      text        NOT NULL,
    tenant_id       text,
    payload         jsonb       NOT NULL,
    -- Optional trace context: traceparent, tracestate, correlationId, causationId.
    headers         jsonb,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    -- Not claimable before this instant; transient failures push it forward.
    available_at    timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    first_failed_at timestamptz,
    -- Set at insert by the publisher trigger from the catalog's key field.
    vpartition      smallint    NOT NULL DEFAULT 0,
    CONSTRAINT outbox_event_id_key UNIQUE (event_id),
    CONSTRAINT outbox_event_id_format CHECK (event_id ~ '^[0-9a-hjkmnp-tv-z]{26}$'),
    CONSTRAINT outbox_event_type_format CHECK (event_type ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$')
);

-- The claim query walks the primary key in id order and stops after one batch,
-- so it stays an index scan however many rows are pending. The payload is never
-- indexed: it would tax every writer for no reader.
COMMENT ON TABLE outbox IS 'Transactional outbox: one row per event not yet acknowledged by Kafka.';

-- Queue tables churn: vacuum them early so dead tuples at the head of the
-- primary key do not slow the claim scan.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 100000,
    autovacuum_analyze_scale_factor = 0.05
);

CREATE TABLE outbox_dlq (
    event_id         text PRIMARY KEY,
    -- The original row, intact.
    outbox_id        bigint      NOT NULL,
    event_type       text        NOT NULL,
    tenant_id        text,
    payload          jsonb       NOT NULL,
    headers          jsonb,
    occurred_at      timestamptz NOT NULL,
    publisher        text,
    vpartition       smallint,
    -- Why it is here.
    reason           text        NOT NULL,
    last_error       text        NOT NULL,
    attempts         integer     NOT NULL,
    first_failed_at  timestamptz NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    -- 'dead' until an admin replays or discards it.
    state            text        NOT NULL DEFAULT 'dead'
                     CHECK (state IN ('dead', 'replayed', 'discarded')),
    replay_count     integer     NOT NULL DEFAULT 0,
    last_replayed_at timestamptz,
    discarded_at     timestamptz,
    discarded_by     text,
    discard_reason   text
);

CREATE INDEX outbox_dlq_dead_idx ON outbox_dlq (reason, event_type, dead_lettered_at)
    WHERE state = 'dead';

COMMENT ON TABLE outbox_dlq IS 'Events that can never be published as they are; see docs/dlq.md.';

-- Permanent consumer-side deduplication (the catalog requires it for money.*:
-- a DLQ replay may re-deliver an event weeks later, so no TTL).
CREATE TABLE processed_event_ids (
    consumer     text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
