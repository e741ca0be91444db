-- Runs once, when the compose Postgres volume is created. The relay logs in
-- as its own role, a member of the outbox_relay group that the migrations
-- grant rights to (they accept the group existing already). The password
-- is for this local stack only.
CREATE ROLE outbox_relay NOLOGIN;
CREATE ROLE relay LOGIN PASSWORD 'relay-local-only' IN ROLE outbox_relay;
