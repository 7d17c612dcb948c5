-- Stream state of a message (AI token streaming) and the action of its latest version.
ALTER TABLE messages ADD COLUMN last_action TEXT NOT NULL DEFAULT 'create';
ALTER TABLE messages ADD COLUMN append_count BIGINT NOT NULL DEFAULT 0;
-- 'none' (never appended), 'open' or 'closed'.
ALTER TABLE messages ADD COLUMN stream_status TEXT NOT NULL DEFAULT 'none';
ALTER TABLE messages ADD COLUMN last_append_at TEXT;
CREATE INDEX messages_open_streams ON messages (channel_id, stream_status);

-- op_id idempotency: the payload fingerprint of the version an op_id produced.
ALTER TABLE message_versions ADD COLUMN fingerprint TEXT;
CREATE INDEX message_versions_op ON message_versions (channel_id, message_serial, action, op_id);
CREATE INDEX message_versions_created ON message_versions (created_at);
