-- The PostgreSQL schema: the same logical schema as migrations/sqlite after all of its
-- migrations, with the same column types as actors/src/store/schema.rs (TEXT, BIGINT,
-- BOOLEAN). Text keys sort bytewise (COLLATE "C") as SQLite's do, whatever the database's
-- locale: pages ordered and filtered by id or timestamp agree on both engines.
--
-- Cluster mode: channels.last_seq and workspaces.last_cursor are read and advanced under a
-- row lock (SELECT … FOR UPDATE) inside each node's write transaction.

CREATE TABLE workspaces (
    id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    app_key TEXT COLLATE "C" NOT NULL UNIQUE,
    secret TEXT NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    last_cursor BIGINT NOT NULL DEFAULT 0,
    pruned_through BIGINT NOT NULL DEFAULT 0,
    created_at TEXT COLLATE "C" NOT NULL
);

CREATE TABLE entities (
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    id TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    kind TEXT NOT NULL,
    role TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    timeout_until TEXT COLLATE "C",
    blocked BOOLEAN NOT NULL DEFAULT FALSE,
    active BOOLEAN NOT NULL DEFAULT TRUE,
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (workspace_id, id)
);

CREATE TABLE channels (
    id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    name TEXT COLLATE "C" NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    channel_type TEXT NOT NULL,
    visibility TEXT NOT NULL,
    join_policy TEXT NOT NULL,
    modify_members TEXT NOT NULL DEFAULT '[]',
    immutable BOOLEAN NOT NULL DEFAULT FALSE,
    tags TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    created_by TEXT NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL,
    archived_at TEXT COLLATE "C",
    last_seq BIGINT NOT NULL DEFAULT 0,
    UNIQUE (workspace_id, name)
);

CREATE TABLE channel_members (
    channel_id TEXT COLLATE "C" NOT NULL REFERENCES channels(id),
    entity_id TEXT COLLATE "C" NOT NULL,
    last_read_seq BIGINT NOT NULL DEFAULT 0,
    joined_at TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (channel_id, entity_id)
);
CREATE INDEX channel_members_entity ON channel_members (entity_id);

CREATE TABLE join_requests (
    channel_id TEXT COLLATE "C" NOT NULL REFERENCES channels(id),
    entity_id TEXT COLLATE "C" NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (channel_id, entity_id)
);

-- The latest visible state of each logical message; its versions are in message_versions.
CREATE TABLE messages (
    channel_id TEXT COLLATE "C" NOT NULL REFERENCES channels(id),
    message_serial TEXT COLLATE "C" NOT NULL,
    history_seq BIGINT NOT NULL,
    workspace_id TEXT COLLATE "C" NOT NULL,
    sender TEXT COLLATE "C" NOT NULL,
    name TEXT NOT NULL,
    data TEXT,
    extras TEXT NOT NULL DEFAULT '{}',
    thread_id TEXT COLLATE "C",
    content_ref TEXT,
    attachments TEXT NOT NULL DEFAULT '[]',
    tags TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    nonce TEXT COLLATE "C",
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    version_serial TEXT COLLATE "C" NOT NULL,
    reply_count BIGINT NOT NULL DEFAULT 0,
    last_reply_at TEXT COLLATE "C",
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL,
    -- Stream state of a message (AI token streaming) and the action of its latest version.
    last_action TEXT NOT NULL DEFAULT 'create',
    append_count BIGINT NOT NULL DEFAULT 0,
    -- 'none' (never appended), 'open' or 'closed'.
    stream_status TEXT NOT NULL DEFAULT 'none',
    last_append_at TEXT COLLATE "C",
    PRIMARY KEY (channel_id, message_serial)
);
CREATE UNIQUE INDEX messages_history ON messages (channel_id, history_seq);
CREATE UNIQUE INDEX messages_nonce ON messages (channel_id, sender, nonce) WHERE nonce IS NOT NULL;
CREATE INDEX messages_thread ON messages (channel_id, thread_id, history_seq);
CREATE INDEX messages_open_streams ON messages (channel_id, stream_status);

-- One row per version (create, update, delete, append); seq is the channel's delivery serial.
CREATE TABLE message_versions (
    channel_id TEXT COLLATE "C" NOT NULL REFERENCES channels(id),
    seq BIGINT NOT NULL,
    message_serial TEXT COLLATE "C" NOT NULL,
    action TEXT COLLATE "C" NOT NULL,
    actor TEXT,
    op_id TEXT COLLATE "C",
    body TEXT NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    -- op_id idempotency: the payload fingerprint of the version an op_id produced.
    fingerprint TEXT,
    PRIMARY KEY (channel_id, seq)
);
CREATE INDEX message_versions_message ON message_versions (channel_id, message_serial, seq);
CREATE INDEX message_versions_op ON message_versions (channel_id, message_serial, action, op_id)
    WHERE op_id IS NOT NULL;
CREATE INDEX message_versions_created ON message_versions (created_at);

CREATE TABLE reactions (
    channel_id TEXT COLLATE "C" NOT NULL,
    message_serial TEXT COLLATE "C" NOT NULL,
    entity_id TEXT COLLATE "C" NOT NULL,
    emoji TEXT COLLATE "C" NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (channel_id, message_serial, entity_id, emoji)
);

-- The durable event log. cursor is dense per workspace and increases in commit order (the
-- workspace row is locked from allocation to COMMIT). Recipients of a private event are
-- ",a,b," (entity ids never contain a comma); replay filters with strpos().
CREATE TABLE events (
    workspace_id TEXT COLLATE "C" NOT NULL,
    cursor BIGINT NOT NULL,
    id TEXT COLLATE "C" NOT NULL,
    event_type TEXT NOT NULL,
    channel_id TEXT COLLATE "C",
    seq BIGINT,
    payload TEXT NOT NULL,
    is_private BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TEXT COLLATE "C" NOT NULL,
    recipients TEXT,
    PRIMARY KEY (workspace_id, cursor)
);
CREATE INDEX events_created ON events (workspace_id, created_at);
