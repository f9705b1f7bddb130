-- Device removal (decommissioning): a removed device keeps its row, so its
-- history, its part in past rollouts and the audit log still name a device
-- the server knows (and its key stays on record as revoked: the row keeps
-- the UNIQUE public key, so the revoked key can never enroll again).
-- Removed devices are left out of every list and count; the census index
-- leaves them out too, so the fleet summary stays an index-only scan
-- (removed_at in it, always NULL, only so that SQLite sees the query's
-- `removed_at IS NULL` covered by the index).
ALTER TABLE devices ADD COLUMN removed_at TEXT;
DROP INDEX IF EXISTS devices_census;
CREATE INDEX devices_census ON devices (device_type, running_version, state, id, removed_at)
    WHERE removed_at IS NULL;
