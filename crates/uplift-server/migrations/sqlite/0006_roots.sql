-- The published roots of trust (see uplift-release/src/root.rs), one row
-- per version, kept for ever: a device that was offline through several
-- rotations walks the whole chain from the root it holds. The server
-- checks each before storing it but never signs one; `signed_json` is the
-- signed envelope exactly as published, served to devices as is.
CREATE TABLE roots (
    version      INTEGER PRIMARY KEY,
    signed_json  TEXT NOT NULL,
    published_at TEXT NOT NULL,
    published_by TEXT NOT NULL
);
