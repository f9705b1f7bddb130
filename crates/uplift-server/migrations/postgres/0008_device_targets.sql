-- A device's target (the rollout whose release it is to run) in a narrow
-- table of its own instead of a column of `devices`. Offering a rollout's
-- first phase to 90 000 devices rewrote 90 000 rows of `devices`, each
-- new row version entered in every one of its nine indexes (the updated
-- column was indexed, so no update was heap-only): 2.2 s of a 4.4 s start,
-- measured with EXPLAIN ANALYZE in the store conformance suite's 100 000
-- device case. Here it is one index. A target is always one of the
-- device's memberships (a rollout offers only its members, and membership
-- rows are never deleted): one foreign key says so, where the column's
-- pointed at `rollouts` alone. A stored target that is no membership (none
-- should be) is not carried over.
CREATE TABLE device_targets (
    device_id  TEXT COLLATE "C" PRIMARY KEY,
    rollout_id BIGINT NOT NULL,
    FOREIGN KEY (rollout_id, device_id) REFERENCES rollout_devices (rollout_id, device_id)
);
INSERT INTO device_targets (device_id, rollout_id)
    SELECT d.id, d.target_rollout FROM devices d
    JOIN rollout_devices rd ON rd.rollout_id = d.target_rollout AND rd.device_id = d.id;
ALTER TABLE devices DROP COLUMN target_rollout;
