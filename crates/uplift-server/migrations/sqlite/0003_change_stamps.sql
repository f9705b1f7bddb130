-- When what a device reported last changed, and when a rollout member's
-- row last changed, as fixed-width UTC text: the rollout scheduler reads
-- only the members changed since its last pass instead of every member
-- every second (see src/rollout/scheduler.rs). Rows from before this
-- migration have none and are read by the scheduler's full loads.
ALTER TABLE devices ADD COLUMN standing_changed_at TEXT;
ALTER TABLE rollout_devices ADD COLUMN changed_at TEXT;
CREATE INDEX devices_by_standing_change ON devices (standing_changed_at)
    WHERE standing_changed_at IS NOT NULL;
CREATE INDEX rollout_devices_by_change ON rollout_devices (rollout_id, changed_at)
    WHERE changed_at IS NOT NULL;
