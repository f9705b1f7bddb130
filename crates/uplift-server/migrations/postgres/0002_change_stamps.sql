-- When what a device reported last changed, and when a rollout member's
-- row last changed: the rollout scheduler reads only the members changed
-- since its last pass instead of every member every second (see
-- src/rollout/scheduler.rs). Stamped with the database's clock
-- (clock_timestamp()), so replicas whose clocks differ agree; rows from
-- before this migration have none and are read by the scheduler's full
-- loads.
ALTER TABLE devices ADD COLUMN standing_changed_at TIMESTAMPTZ;
ALTER TABLE rollout_devices ADD COLUMN changed_at TIMESTAMPTZ;
CREATE INDEX devices_by_standing_change ON devices (standing_changed_at)
    WHERE standing_changed_at IS NOT NULL;
CREATE INDEX rollout_devices_by_change ON rollout_devices (rollout_id, changed_at)
    WHERE changed_at IS NOT NULL;
