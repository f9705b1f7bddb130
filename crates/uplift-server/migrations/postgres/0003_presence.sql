-- Which replica holds each device's channel, so every replica shows the
-- whole fleet's `online` (src/presence.rs). A replica writes its sessions'
-- changes and a heartbeat every second; one not heard from for 10 s is
-- dropped, its presence with it (ON DELETE CASCADE), so the devices of a
-- killed replica go offline until they reconnect elsewhere. A device's
-- row names the replica of its newest connection (`connected_at`, the
-- replica's clock), so a late write from the replica it left never hides
-- where it is now.
CREATE TABLE replicas (
    id          TEXT COLLATE "C" PRIMARY KEY,
    started_at  TIMESTAMPTZ NOT NULL,
    seen_at     TIMESTAMPTZ NOT NULL
);
CREATE TABLE device_presence (
    device_id     TEXT COLLATE "C" PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    replica_id    TEXT COLLATE "C" NOT NULL REFERENCES replicas(id) ON DELETE CASCADE,
    connected_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX device_presence_by_replica ON device_presence (replica_id);
