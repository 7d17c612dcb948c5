CREATE INDEX events_created ON events (workspace_id, created_at);
