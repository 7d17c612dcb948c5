//! The connection of either engine. diesel's `MultiConnection` derive gives the enum one
//! backend (`MultiBackend`) over which the portable queries are written once; statements
//! that differ between the dialects, or that sit on the writer's hot path, match on the
//! variant and run natively on the engine's own connection ([`on_engine!`]).

use diesel::pg::PgConnection;
use diesel::sqlite::SqliteConnection;

/// A connection to SQLite (one node, the default) or PostgreSQL (cluster mode).
#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    Sqlite(SqliteConnection),
    Pg(PgConnection),
}

impl AnyConnection {
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Pg(_))
    }
}

/// Runs the same diesel code natively on the connection of either engine: `$c` is the
/// `&mut SqliteConnection` or the `&mut PgConnection` inside `$conn` (an `&mut Conn`).
macro_rules! on_engine {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::store::AnyConnection::Sqlite($c) => $body,
            $crate::store::AnyConnection::Pg($c) => $body,
        }
    };
}
pub(crate) use on_engine;
