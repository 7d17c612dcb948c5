pub mod cluster;
pub mod harness;
pub mod pg_server;
pub mod pusher_client;
pub mod redis_server;
pub mod webhook_receiver;
