DROP INDEX messages_thread;
CREATE INDEX messages_thread ON messages (channel_id, thread_id, history_seq);
DROP INDEX messages_open_streams;
CREATE INDEX messages_open_streams ON messages (channel_id, stream_status);
