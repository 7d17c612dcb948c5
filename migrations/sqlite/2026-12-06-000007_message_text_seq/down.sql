ALTER TABLE messages DROP COLUMN text_seq;
