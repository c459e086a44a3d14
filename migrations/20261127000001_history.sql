-- Room history: every persisted message, exactly as live subscribers received it.

-- One row per room that ever had a persisted message. `last_seq` survives retention, so
-- sequence numbers never restart even when every message of a room has expired.
CREATE TABLE rooms (
    name     TEXT PRIMARY KEY NOT NULL,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;

-- Clustered on (room, seq): a page of history is one range scan.
CREATE TABLE messages (
    room       TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;

-- For age-based retention.
CREATE INDEX messages_by_age ON messages (created_ms);
