-- Per-room sequence reservations replace the one run-wide margin of migration 4.
--
-- With `batched` durability a message is delivered before it is committed. A room may
-- deliver numbers up to `rooms.reserved` before they are stored: the writer raises it, in
-- the same transaction as the messages, ahead of what the room will use before its next
-- commit, and lowers it back to the room's last number once the room has been quiet.
-- At start-up a room continues from the largest of its highest stored seq, `last_seq` and
-- `reserved`: after a crash only rooms that were busy jump, and by at most their
-- reservation, where migration 4 moved every room past the whole queue (66,560 numbers).
ALTER TABLE rooms ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0;

-- A run of an older version that crashed: give its margin to every room, once.
UPDATE rooms SET reserved =
    max(last_seq, coalesce((SELECT max(seq) FROM messages WHERE room = rooms.name), 0))
    + (SELECT value FROM meta WHERE key = 'unclean_margin')
WHERE EXISTS (SELECT 1 FROM meta WHERE key = 'unclean_margin');
DELETE FROM meta WHERE key = 'unclean_margin';
