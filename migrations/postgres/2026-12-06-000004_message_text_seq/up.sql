-- A long streamed text is not rewritten by every append (docs/versioned-messages.md,
-- "Stored text of a long stream"): `text_seq` is the version through which `data` is
-- written, and the message's appends after it hold the rest. NULL: `data` is current.
ALTER TABLE messages ADD COLUMN text_seq BIGINT;
