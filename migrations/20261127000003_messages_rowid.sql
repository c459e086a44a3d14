-- Messages move from a WITHOUT ROWID table to an ordinary rowid table with a unique index
-- on (room, seq), and the per-insert bookkeeping shrinks to what a commit cannot avoid.
--
-- A commit of a few messages is what a `per_message` delivery waits for, so every page it
-- writes counts:
-- * SQLite advises WITHOUT ROWID only for rows under ~1/20 of a page; a chat message is
--   ~300 bytes of a 4 KiB page. Appending to that b-tree rebalanced three leaf pages at
--   every split, where an append to a rowid table (rowids only grow) takes the quick path.
-- * The index on created_ms is gone: rowids follow publishing order, and so, within clock
--   precision, does created_ms, so age retention deletes from the lowest rowid up.
-- * rooms.last_seq is no longer rewritten by every insert. A room gets its row once (its
--   first message), and last_seq is raised when messages are deleted; the last sequence
--   number of a room is the larger of last_seq and its highest stored seq.
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

CREATE TRIGGER messages_room AFTER INSERT ON messages
WHEN NOT EXISTS (SELECT 1 FROM rooms WHERE name = NEW.room)
BEGIN
    INSERT INTO rooms (name, last_seq) VALUES (NEW.room, 0);
END;

-- Retention may delete a room's newest messages; its numbering must not restart.
CREATE TRIGGER messages_deleted AFTER DELETE ON messages
BEGIN
    UPDATE rooms SET last_seq = max(last_seq, OLD.seq) WHERE name = OLD.room;
END;
