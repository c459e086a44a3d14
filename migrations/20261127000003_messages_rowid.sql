-- Messages move from a WITHOUT ROWID table to an ordinary rowid table with a unique index
-- on (room, seq). SQLite advises WITHOUT ROWID only for rows under ~1/20 of a page; a chat
-- message is ~300 bytes of a 4 KiB page. Appending to a WITHOUT ROWID b-tree rebalances
-- three leaf pages at every split, where an append to a rowid table (rowids only grow)
-- takes SQLite's quick path: a commit of a few messages now writes about half the pages,
-- and the commit is what a `per_message` delivery waits for.
CREATE TABLE messages_rowid (
    room       TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    body       TEXT NOT NULL
);
INSERT INTO messages_rowid (room, seq, created_ms, body)
    SELECT room, seq, created_ms, body FROM messages ORDER BY created_ms, room, seq;
DROP TRIGGER messages_last_seq;
DROP TABLE messages;
ALTER TABLE messages_rowid RENAME TO messages;
-- A page of history is one range scan of this index.
CREATE UNIQUE INDEX messages_by_room_seq ON messages (room, seq);
-- For age-based retention.
CREATE INDEX messages_by_age ON messages (created_ms);
CREATE TRIGGER messages_last_seq AFTER INSERT ON messages
BEGIN
    INSERT INTO rooms (name, last_seq) VALUES (NEW.room, NEW.seq)
    ON CONFLICT (name) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq);
END;
