-- Two foreign keys that guarded nothing the statements writing these rows
-- do not already guarantee, and that cost half of a large rollout's
-- member write. A foreign-key check locks the row it finds (KEY SHARE),
-- which writes that row's header: writing 100 000 members locked, and so
-- wrote, 100 000 rows of `devices` while their devices reported their
-- first offers (and those locks, taken in list order, once deadlocked
-- with the device-state writer); offering them locked 100 000 fresh rows
-- of `rollout_devices` again. Measured on a quiet database with 100 000
-- devices: the members' insert 2.3 s with the key, 1.3 s without; the
-- targets' upsert 2.3 s with it, 0.9 s without.
--
-- What the keys said stays true by construction (store/postgres.rs):
-- a member is written only by a statement that joins it to an enrolled,
-- not removed, device (and devices are never deleted, only marked
-- removed); a target only by a statement that joins it to its membership
-- row (and memberships are never deleted). SQLite keeps both keys: there
-- one server writes, and its checks lock nothing.
ALTER TABLE rollout_devices DROP CONSTRAINT rollout_devices_device_id_fkey;
ALTER TABLE device_targets DROP CONSTRAINT device_targets_rollout_id_device_id_fkey;
