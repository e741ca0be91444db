-- Running relays, as they report themselves every few seconds: what
-- `outbox-relay status` shows as "last successful publish", and the
-- membership that lease assignment builds on.
CREATE TABLE outbox_relays (
    relay_id        text PRIMARY KEY,
    source          text        NOT NULL,
    host            text        NOT NULL,
    version         text        NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    last_publish_at timestamptz,
    published_total bigint      NOT NULL DEFAULT 0,
    -- Set by a graceful shutdown; the row stays so that `status` still
    -- knows the last publish when no relay runs.
    stopped_at      timestamptz
);

REVOKE ALL ON outbox_relays FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relays TO outbox_relay;
GRANT SELECT ON outbox_relays TO outbox_admin;
