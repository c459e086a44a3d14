-- With `batched` durability a message is delivered before it is committed, so a crash can
-- lose delivered messages. Their sequence numbers must not be given to new messages after
-- the restart: a client that saw them would take the new ones for what it already has.
-- While a batched run is open, `meta` holds 'unclean_margin', the most messages that run
-- can have delivered without committing; a clean shutdown deletes it. At start-up a margin
-- still there means the last run crashed, and every room's numbering moves past it.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
