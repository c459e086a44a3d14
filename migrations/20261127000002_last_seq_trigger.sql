-- Keep rooms.last_seq in step with every insert, inside the inserting statement itself, so
-- that a batch of messages is committed by a single statement (one round trip to SQLite,
-- one implicit transaction) instead of an explicit transaction of several.
CREATE TRIGGER messages_last_seq AFTER INSERT ON messages
BEGIN
    INSERT INTO rooms (name, last_seq) VALUES (NEW.room, NEW.seq)
    ON CONFLICT (name) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq);
END;
