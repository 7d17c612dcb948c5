-- Every message row was in both indexes, though only replies are looked up by thread and only
-- open streams by status: each chat post dirtied their two leaf pages, written to the WAL and
-- fsynced with its commit. Now a root message that never streams is in neither.
-- Queries name the same terms (thread_id = ? implies NOT NULL; stream_status = 'open' is a
-- literal in the query), so both indexes still serve them.
DROP INDEX messages_thread;
CREATE INDEX messages_thread ON messages (channel_id, thread_id, history_seq)
    WHERE thread_id IS NOT NULL;
DROP INDEX messages_open_streams;
CREATE INDEX messages_open_streams ON messages (channel_id)
    WHERE stream_status = 'open';
