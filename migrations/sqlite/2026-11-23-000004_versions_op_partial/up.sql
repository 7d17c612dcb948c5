-- Only versions written with an op_id are ever looked up by it (op_id = ? implies NOT NULL,
-- so SQLite still uses this index): most appends carry none and skip one index insert each.
DROP INDEX message_versions_op;
CREATE INDEX message_versions_op ON message_versions (channel_id, message_serial, action, op_id)
    WHERE op_id IS NOT NULL;
