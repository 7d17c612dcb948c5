// Written by hand to match migrations/; kept portable between SQLite and PostgreSQL.

diesel::table! {
    workspaces (id) {
        id -> Text,
        app_key -> Text,
        secret -> Text,
        name -> Text,
        settings -> Text,
        last_cursor -> BigInt,
        pruned_through -> BigInt,
        created_at -> Text,
    }
}

diesel::table! {
    entities (workspace_id, id) {
        workspace_id -> Text,
        id -> Text,
        name -> Text,
        kind -> Text,
        role -> Text,
        metadata -> Text,
        timeout_until -> Nullable<Text>,
        blocked -> Bool,
        active -> Bool,
        created_at -> Text,
        updated_at -> Text,
    }
}

diesel::table! {
    channels (id) {
        id -> Text,
        workspace_id -> Text,
        name -> Text,
        description -> Text,
        channel_type -> Text,
        visibility -> Text,
        join_policy -> Text,
        modify_members -> Text,
        immutable -> Bool,
        tags -> Text,
        metadata -> Text,
        created_by -> Text,
        created_at -> Text,
        updated_at -> Text,
        archived_at -> Nullable<Text>,
        last_seq -> BigInt,
    }
}

diesel::table! {
    channel_members (channel_id, entity_id) {
        channel_id -> Text,
        entity_id -> Text,
        last_read_seq -> BigInt,
        joined_at -> Text,
    }
}

diesel::table! {
    join_requests (channel_id, entity_id) {
        channel_id -> Text,
        entity_id -> Text,
        created_at -> Text,
    }
}

diesel::table! {
    messages (channel_id, message_serial) {
        channel_id -> Text,
        message_serial -> Text,
        history_seq -> BigInt,
        workspace_id -> Text,
        sender -> Text,
        name -> Text,
        data -> Nullable<Text>,
        extras -> Text,
        thread_id -> Nullable<Text>,
        content_ref -> Nullable<Text>,
        attachments -> Text,
        tags -> Text,
        metadata -> Text,
        nonce -> Nullable<Text>,
        deleted -> Bool,
        version_serial -> Text,
        reply_count -> BigInt,
        last_reply_at -> Nullable<Text>,
        created_at -> Text,
        updated_at -> Text,
        last_action -> Text,
        append_count -> BigInt,
        stream_status -> Text,
        last_append_at -> Nullable<Text>,
        text_seq -> Nullable<BigInt>,
    }
}

diesel::table! {
    message_versions (channel_id, seq) {
        channel_id -> Text,
        seq -> BigInt,
        message_serial -> Text,
        action -> Text,
        actor -> Nullable<Text>,
        op_id -> Nullable<Text>,
        body -> Text,
        created_at -> Text,
        fingerprint -> Nullable<Text>,
    }
}

diesel::table! {
    reactions (channel_id, message_serial, entity_id, emoji) {
        channel_id -> Text,
        message_serial -> Text,
        entity_id -> Text,
        emoji -> Text,
        created_at -> Text,
    }
}

diesel::table! {
    events (workspace_id, cursor) {
        workspace_id -> Text,
        cursor -> BigInt,
        id -> Text,
        event_type -> Text,
        channel_id -> Nullable<Text>,
        seq -> Nullable<BigInt>,
        payload -> Text,
        is_private -> Bool,
        created_at -> Text,
        recipients -> Nullable<Text>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    workspaces,
    entities,
    channels,
    channel_members,
    join_requests,
    messages,
    message_versions,
    reactions,
    events,
);

diesel::joinable!(channel_members -> channels (channel_id));
