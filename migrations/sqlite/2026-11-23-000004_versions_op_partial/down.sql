DROP INDEX message_versions_op;
CREATE INDEX message_versions_op ON message_versions (channel_id, message_serial, action, op_id);
