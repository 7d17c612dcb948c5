-- A long stream's appends do not rewrite its message row (docs/versioned-messages.md,
-- "Stored text of a long stream"): `text_seq` marks a row as written through that version,
-- and the message's appends after it, in its versions, are folded in by readers.
-- NULL: the row is current.
ALTER TABLE messages ADD COLUMN text_seq BIGINT;
