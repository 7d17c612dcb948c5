DROP INDEX message_versions_created;
DROP INDEX message_versions_op;
ALTER TABLE message_versions DROP COLUMN fingerprint;
DROP INDEX messages_open_streams;
ALTER TABLE messages DROP COLUMN last_append_at;
ALTER TABLE messages DROP COLUMN stream_status;
ALTER TABLE messages DROP COLUMN append_count;
ALTER TABLE messages DROP COLUMN last_action;
