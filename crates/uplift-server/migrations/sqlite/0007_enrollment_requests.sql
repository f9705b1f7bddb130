-- Enrollment requests in the `[enrollment] mode = "approval"` server (see
-- src/service/enrollment.rs): a new device that presented a valid token
-- waits here until an operator accepts or rejects it. One row per device
-- key (UNIQUE): a rejected key stays rejected, so its device is refused at
-- once and never comes back into the pending list unless an operator
-- accepts it. `device_id` is the ID an accepted request was given (set
-- before the device row is stored, hence no foreign key: see accept()).
CREATE TABLE enrollment_requests (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    public_key   TEXT NOT NULL UNIQUE,
    key_fingerprint TEXT NOT NULL,
    device_type  TEXT NOT NULL,
    hardware_id  TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'accepted', 'rejected')),
    decided_at   TEXT,
    decided_by   TEXT,
    reason       TEXT,
    device_id    TEXT
);
CREATE INDEX enrollment_requests_by_state ON enrollment_requests (state, id);

-- Enrollment tokens limited in use (`uplift token create --max-uses N`): a
-- use is one new device enrolled or put in the pending list with it.
-- NULL: no limit. Counted in one UPDATE that only passes below the limit.
ALTER TABLE api_tokens ADD COLUMN max_uses INTEGER;
ALTER TABLE api_tokens ADD COLUMN uses INTEGER NOT NULL DEFAULT 0;
