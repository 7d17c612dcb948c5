pub mod harness;
pub mod pusher_client;
