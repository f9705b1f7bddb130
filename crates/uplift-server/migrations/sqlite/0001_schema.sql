-- The schema as servers made it in code before migrations (every table
-- and index, with every column added in place since the first release).
-- A database from before migrations is brought up to this first by the
-- store (the columns it lacks are added), and this, being all `IF NOT
-- EXISTS`, then finds nothing left to make. Never edit an applied
-- migration: add a new one.

CREATE TABLE IF NOT EXISTS releases (
    version       TEXT PRIMARY KEY,
    device_type   TEXT NOT NULL,
    manifest      BLOB NOT NULL,
    image_size    INTEGER NOT NULL,
    image_sha256  TEXT NOT NULL,
    chunks        INTEGER NOT NULL,
    stored_bytes  INTEGER NOT NULL,
    created_at    TEXT NOT NULL,
    key_ids       TEXT,
    expires_at    TEXT
);
CREATE TABLE IF NOT EXISTS rollouts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    release         TEXT NOT NULL REFERENCES releases(version),
    allow_downgrade INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    max_bytes_per_sec INTEGER,
    max_downloading   INTEGER,
    policy          TEXT,
    state           TEXT,
    state_name      TEXT,
    revision        INTEGER NOT NULL DEFAULT 0,
    tags            TEXT,
    from_versions   TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    id               TEXT PRIMARY KEY,
    device_type      TEXT NOT NULL,
    hardware_id      TEXT NOT NULL,
    public_key       TEXT NOT NULL UNIQUE,
    enrolled_at      TEXT NOT NULL,
    last_seen        TEXT,
    running_version  TEXT,
    state            TEXT,
    booted_slot      TEXT,
    reported_target  TEXT,
    progress_done    INTEGER,
    progress_total   INTEGER,
    progress_fetched INTEGER,
    error_kind       TEXT,
    error_message    TEXT,
    target_rollout   INTEGER REFERENCES rollouts(id),
    address          TEXT
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    device_id  TEXT NOT NULL REFERENCES devices(id),
    phase      INTEGER NOT NULL DEFAULT 0,
    offered_at TEXT,
    outcome    TEXT,
    error      TEXT,
    failure_accepted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX IF NOT EXISTS rollout_devices_by_device ON rollout_devices (device_id, rollout_id);
-- Device lists filter by these and page by id: each index serves an
-- equality filter and the id order of the page in one range scan.
CREATE INDEX IF NOT EXISTS devices_by_type ON devices (device_type, id);
CREATE INDEX IF NOT EXISTS devices_by_version ON devices (running_version, id);
CREATE INDEX IF NOT EXISTS devices_by_state ON devices (state, id);
-- The fleet summary's census groups by these and probes each id: an
-- index-only scan in group order, no sort, no table row read (at 100 000
-- devices, half of them connected, about half the time of a table scan).
CREATE INDEX IF NOT EXISTS devices_census ON devices (device_type, running_version, state, id);
CREATE TABLE IF NOT EXISTS device_tags (
    device_id TEXT NOT NULL REFERENCES devices(id),
    tag       TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS device_tags_by_tag ON device_tags (tag, device_id);
-- A device's history. AUTOINCREMENT: ids never come back after pruning,
-- so a `before` cursor always means the same place. No foreign key: an
-- event of a device unknown here (never the case today) must not block
-- the writer's batch behind it.
CREATE TABLE IF NOT EXISTS device_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    at        TEXT NOT NULL,
    kind      TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS device_events_by_device ON device_events (device_id, id);
CREATE INDEX IF NOT EXISTS device_events_by_time ON device_events (at);

-- Operators' API tokens, the audit log, webhooks and leases.
CREATE TABLE IF NOT EXISTS api_tokens (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    expires_at    TEXT,
    revoked_at    TEXT
);
CREATE TABLE IF NOT EXISTS audit_log (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    at            TEXT NOT NULL,
    actor         TEXT NOT NULL,
    token_id      INTEGER,
    role          TEXT NOT NULL,
    action        TEXT NOT NULL,
    target        TEXT NOT NULL,
    error_kind    TEXT,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS audit_log_by_action ON audit_log (action, id);
CREATE INDEX IF NOT EXISTS audit_log_by_actor ON audit_log (actor, id);
CREATE INDEX IF NOT EXISTS audit_log_by_target ON audit_log (target, id);
CREATE TRIGGER IF NOT EXISTS audit_log_append_only_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_append_only_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS webhooks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    url         TEXT NOT NULL,
    secret      TEXT NOT NULL,
    filter      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    removed_at  TEXT
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id    INTEGER NOT NULL REFERENCES webhooks(id),
    event         TEXT NOT NULL,
    payload       TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending',
    attempts      INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL,
    due_ms        INTEGER,
    delivered_at  TEXT,
    last_status   INTEGER,
    last_error_kind    TEXT,
    last_error_message TEXT
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (status, due_ms);
CREATE INDEX IF NOT EXISTS webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, id);
CREATE TABLE IF NOT EXISTS leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
-- The fleet summary asks of every device whether it waits for a phase of
-- a rollout, and of those at work on their target whether a newer rollout
-- took them over: two partial indexes holding just those memberships,
-- with the columns asked about, so that no member row is read.
CREATE INDEX IF NOT EXISTS rollout_devices_waiting
    ON rollout_devices (device_id, rollout_id, offered_at, outcome)
    WHERE offered_at IS NULL AND outcome IS NULL;
CREATE INDEX IF NOT EXISTS rollout_devices_superseded
    ON rollout_devices (rollout_id, device_id, outcome) WHERE outcome = 'superseded';
-- A rollout's devices are paged in phase order (the console, the CLI).
CREATE INDEX IF NOT EXISTS rollout_devices_by_phase ON rollout_devices (rollout_id, phase, device_id);
