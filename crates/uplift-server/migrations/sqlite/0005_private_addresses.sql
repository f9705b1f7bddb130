-- Each device's private-network address, one per configured pool (see
-- src/addresses.rs). UNIQUE (address): two replicas that pick the same
-- address for two devices at once cannot both store it; the loser picks
-- again. The primary key holds a device to one address per pool. A
-- removed device's rows are deleted: its addresses go back to the pool.
CREATE TABLE device_addresses (
    device_id   TEXT NOT NULL REFERENCES devices(id),
    pool        TEXT NOT NULL,
    address     TEXT NOT NULL UNIQUE,
    cidr        TEXT NOT NULL,
    assigned_at TEXT NOT NULL,
    PRIMARY KEY (device_id, pool)
) WITHOUT ROWID;
CREATE INDEX device_addresses_by_pool ON device_addresses (pool, address);
