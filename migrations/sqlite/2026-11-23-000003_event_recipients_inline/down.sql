CREATE TABLE event_recipients (
    workspace_id TEXT NOT NULL,
    cursor BIGINT NOT NULL,
    entity_id TEXT NOT NULL,
    PRIMARY KEY (workspace_id, cursor, entity_id)
);
CREATE INDEX event_recipients_entity ON event_recipients (workspace_id, entity_id, cursor);
ALTER TABLE events DROP COLUMN recipients;
