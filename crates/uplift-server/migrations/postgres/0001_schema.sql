-- The schema on PostgreSQL: the same tables, columns and meaning as on
-- SQLite (migrations/sqlite), with typed times (timestamptz), booleans and
-- identity columns. IDs and tags that lists are ordered and paged by are
-- `COLLATE "C"`: byte order, as on SQLite, whatever the database's locale.
-- Policies, states, selectors and key IDs are JSON text, as on SQLite.
-- Never edit an applied migration: add a new one.

CREATE TABLE releases (
    version       TEXT PRIMARY KEY,
    device_type   TEXT NOT NULL,
    manifest      BYTEA NOT NULL,
    image_size    BIGINT NOT NULL,
    image_sha256  TEXT NOT NULL,
    chunks        BIGINT NOT NULL,
    stored_bytes  BIGINT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    key_ids       TEXT,
    expires_at    TIMESTAMPTZ
);
CREATE TABLE rollouts (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    release           TEXT NOT NULL REFERENCES releases(version),
    allow_downgrade   BOOLEAN NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    max_bytes_per_sec BIGINT,
    max_downloading   BIGINT,
    policy            TEXT,
    state             TEXT,
    state_name        TEXT,
    revision          BIGINT NOT NULL DEFAULT 0,
    tags              TEXT,
    from_versions     TEXT
);
CREATE TABLE devices (
    id               TEXT COLLATE "C" PRIMARY KEY,
    device_type      TEXT COLLATE "C" NOT NULL,
    hardware_id      TEXT COLLATE "C" NOT NULL,
    public_key       TEXT NOT NULL UNIQUE,
    enrolled_at      TIMESTAMPTZ NOT NULL,
    last_seen        TIMESTAMPTZ,
    running_version  TEXT COLLATE "C",
    state            TEXT COLLATE "C",
    booted_slot      TEXT,
    reported_target  TEXT,
    progress_done    BIGINT,
    progress_total   BIGINT,
    progress_fetched BIGINT,
    error_kind       TEXT,
    error_message    TEXT,
    target_rollout   BIGINT REFERENCES rollouts(id),
    address          TEXT
);
CREATE TABLE rollout_devices (
    rollout_id       BIGINT NOT NULL REFERENCES rollouts(id),
    device_id        TEXT COLLATE "C" NOT NULL REFERENCES devices(id),
    phase            BIGINT NOT NULL DEFAULT 0,
    offered_at       TIMESTAMPTZ,
    outcome          TEXT,
    error            TEXT,
    failure_accepted BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id, rollout_id);
CREATE INDEX rollout_devices_waiting
    ON rollout_devices (device_id, rollout_id) WHERE offered_at IS NULL AND outcome IS NULL;
CREATE INDEX rollout_devices_superseded
    ON rollout_devices (rollout_id, device_id) WHERE outcome = 'superseded';
CREATE INDEX rollout_devices_by_phase ON rollout_devices (rollout_id, phase, device_id);
-- Device lists filter by these and page by id (see the SQLite schema).
CREATE INDEX devices_by_type ON devices (device_type, id);
CREATE INDEX devices_by_version ON devices (running_version, id);
CREATE INDEX devices_by_state ON devices (state, id);
CREATE INDEX devices_census ON devices (device_type, running_version, state, id);
CREATE INDEX devices_by_target ON devices (target_rollout) WHERE target_rollout IS NOT NULL;
CREATE TABLE device_tags (
    device_id TEXT COLLATE "C" NOT NULL REFERENCES devices(id),
    tag       TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag, device_id);
-- A device's history; identity ids are never given out again, so a
-- `before` cursor keeps its place after pruning. No foreign key (see the
-- SQLite schema).
CREATE TABLE device_events (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id TEXT COLLATE "C" NOT NULL,
    at        TIMESTAMPTZ NOT NULL,
    kind      TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX device_events_by_device ON device_events (device_id, id);
CREATE INDEX device_events_by_time ON device_events (at);

-- Operators' API tokens, the audit log, webhooks and leases.
CREATE TABLE api_tokens (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at    TIMESTAMPTZ NOT NULL,
    created_by    TEXT NOT NULL,
    expires_at    TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ
);
CREATE TABLE audit_log (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at            TIMESTAMPTZ NOT NULL,
    actor         TEXT NOT NULL,
    token_id      BIGINT,
    role          TEXT NOT NULL,
    action        TEXT NOT NULL,
    target        TEXT NOT NULL,
    error_kind    TEXT,
    error_message TEXT
);
CREATE INDEX audit_log_by_action ON audit_log (action, id);
CREATE INDEX audit_log_by_actor ON audit_log (actor, id);
CREATE INDEX audit_log_by_target ON audit_log (target, id);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_append_only_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
CREATE TABLE webhooks (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url         TEXT NOT NULL,
    secret      TEXT NOT NULL,
    filter      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    created_by  TEXT NOT NULL,
    removed_at  TIMESTAMPTZ
);
CREATE TABLE webhook_deliveries (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id         BIGINT NOT NULL REFERENCES webhooks(id),
    event              TEXT NOT NULL,
    payload            TEXT NOT NULL,
    status             TEXT NOT NULL DEFAULT 'pending',
    attempts           BIGINT NOT NULL DEFAULT 0,
    created_at         TIMESTAMPTZ NOT NULL,
    due_ms             BIGINT,
    delivered_at       TIMESTAMPTZ,
    last_status        BIGINT,
    last_error_kind    TEXT,
    last_error_message TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, due_ms);
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, id);
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);
