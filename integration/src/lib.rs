pub mod harness;
pub mod pusher_client;
pub mod redis_server;
