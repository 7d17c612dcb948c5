-- Workspaces are tenants (the Pusher "app"). last_cursor is the dense per-workspace
-- event cursor, allocated inside the write transaction.
CREATE TABLE workspaces (
    id TEXT PRIMARY KEY NOT NULL,
    app_key TEXT NOT NULL UNIQUE,
    secret TEXT NOT NULL,
    name TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    last_cursor BIGINT NOT NULL DEFAULT 0,
    pruned_through BIGINT NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);

CREATE TABLE entities (
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    role TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    timeout_until TEXT,
    blocked BOOLEAN NOT NULL DEFAULT FALSE,
    active BOOLEAN NOT NULL DEFAULT TRUE,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (workspace_id, id)
);

CREATE TABLE channels (
    id TEXT PRIMARY KEY NOT NULL,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    channel_type TEXT NOT NULL,
    visibility TEXT NOT NULL,
    join_policy TEXT NOT NULL,
    modify_members TEXT NOT NULL DEFAULT '[]',
    immutable BOOLEAN NOT NULL DEFAULT FALSE,
    tags TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    archived_at TEXT,
    last_seq BIGINT NOT NULL DEFAULT 0,
    UNIQUE (workspace_id, name)
);

CREATE TABLE channel_members (
    channel_id TEXT NOT NULL REFERENCES channels(id),
    entity_id TEXT NOT NULL,
    last_read_seq BIGINT NOT NULL DEFAULT 0,
    joined_at TEXT NOT NULL,
    PRIMARY KEY (channel_id, entity_id)
);
CREATE INDEX channel_members_entity ON channel_members (entity_id);

CREATE TABLE join_requests (
    channel_id TEXT NOT NULL REFERENCES channels(id),
    entity_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (channel_id, entity_id)
);

-- The latest visible state of each logical message; its versions are in message_versions.
CREATE TABLE messages (
    channel_id TEXT NOT NULL REFERENCES channels(id),
    message_serial TEXT NOT NULL,
    history_seq BIGINT NOT NULL,
    workspace_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT,
    extras TEXT NOT NULL DEFAULT '{}',
    thread_id TEXT,
    content_ref TEXT,
    attachments TEXT NOT NULL DEFAULT '[]',
    tags TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    nonce TEXT,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    version_serial TEXT NOT NULL,
    reply_count BIGINT NOT NULL DEFAULT 0,
    last_reply_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (channel_id, message_serial)
);
CREATE UNIQUE INDEX messages_history ON messages (channel_id, history_seq);
CREATE UNIQUE INDEX messages_nonce ON messages (channel_id, sender, nonce) WHERE nonce IS NOT NULL;
CREATE INDEX messages_thread ON messages (channel_id, thread_id, history_seq);

-- One row per version (create, update, delete, append); seq is the channel's delivery serial.
CREATE TABLE message_versions (
    channel_id TEXT NOT NULL REFERENCES channels(id),
    seq BIGINT NOT NULL,
    message_serial TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT,
    op_id TEXT,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (channel_id, seq)
);
CREATE INDEX message_versions_message ON message_versions (channel_id, message_serial, seq);

CREATE TABLE reactions (
    channel_id TEXT NOT NULL,
    message_serial TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    emoji TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (channel_id, message_serial, entity_id, emoji)
);

-- The durable event log. cursor is dense per workspace and increases in commit order.
CREATE TABLE events (
    workspace_id TEXT NOT NULL,
    cursor BIGINT NOT NULL,
    id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    channel_id TEXT,
    seq BIGINT,
    payload TEXT NOT NULL,
    is_private BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TEXT NOT NULL,
    PRIMARY KEY (workspace_id, cursor)
);
CREATE INDEX events_created ON events (workspace_id, created_at);

-- Recipients of private events; an event with recipients replays only to them.
CREATE TABLE event_recipients (
    workspace_id TEXT NOT NULL,
    cursor BIGINT NOT NULL,
    entity_id TEXT NOT NULL,
    PRIMARY KEY (workspace_id, cursor, entity_id)
);
CREATE INDEX event_recipients_entity ON event_recipients (workspace_id, entity_id, cursor);
