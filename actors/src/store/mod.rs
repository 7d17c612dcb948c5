//! Storage: diesel schema, row types and one function per query, each taking `&mut Conn`.

pub mod cluster_queries;
pub mod fixed;
pub mod listing;
pub mod queries;
pub mod rows;
pub mod schema;

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool, PooledConnection};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub type Conn = SqliteConnection;
pub type DbPool = Pool<ConnectionManager<Conn>>;
pub type PooledConn = PooledConnection<ConnectionManager<Conn>>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// Where the database lives, parsed from `sqlite://path` (or a bare path).
#[derive(Debug, Clone)]
pub struct DatabaseUrl {
    pub path: String,
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Err(
                "PostgreSQL is not supported by this build yet (cluster mode is issue 6)".into(),
            );
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if path.is_empty() {
            return Err("empty database path".into());
        }
        Ok(Self {
            path: path.to_string(),
        })
    }
}

/// How a commit reaches the disk (SQLite `synchronous` in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit is fsynced before it is acknowledged: survives a power cut.
    #[default]
    Full,
    /// Commits are written to the WAL but fsynced only at checkpoints: survives a crash of
    /// the process, not of the machine. Removes the fsync from every write's latency.
    Normal,
}

impl Durability {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Self::Full),
            "normal" => Ok(Self::Normal),
            other => Err(format!("durability must be full or normal, not '{other}'")),
        }
    }
}

#[derive(Debug)]
struct Pragmas(Durability);

impl CustomizeConnection<Conn, diesel::r2d2::Error> for Pragmas {
    fn on_acquire(&self, conn: &mut Conn) -> Result<(), diesel::r2d2::Error> {
        let synchronous = match self.0 {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.batch_execute(&format!(
            // temp_store: savepoint sub-journals stay in memory instead of temp files (one
            // savepoint per write in a group commit).
            "PRAGMA busy_timeout = 5000; PRAGMA synchronous = {synchronous}; \
             PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;"
        ))
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// Opens (creating the file and its folder) and migrates the database, returning a pool.
pub fn open(url: &DatabaseUrl, max_size: u32) -> Result<DbPool, String> {
    open_with(url, max_size, Durability::Full)
}

/// [`open`] with a chosen commit durability.
pub fn open_with(
    url: &DatabaseUrl,
    max_size: u32,
    durability: Durability,
) -> Result<DbPool, String> {
    if let Some(parent) = std::path::Path::new(&url.path).parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
    }
    // WAL is a property of the file: set it once, before the pool opens its connections.
    {
        use diesel::Connection;
        let mut conn = Conn::establish(&url.path)
            .map_err(|e| format!("cannot open database {}: {e}", url.path))?;
        conn.batch_execute("PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL;")
            .map_err(|e| format!("cannot enable WAL: {e}"))?;
    }
    let manager = ConnectionManager::<Conn>::new(url.path.clone());
    let pool = Pool::builder()
        .max_size(max_size)
        .connection_timeout(Duration::from_secs(5))
        .connection_customizer(Box::new(Pragmas(durability)))
        .build(manager)
        .map_err(|e| format!("cannot open database {}: {e}", url.path))?;
    let mut conn = pool
        .get()
        .map_err(|e| format!("cannot open database: {e}"))?;
    conn.run_pending_migrations(MIGRATIONS)
        .map_err(|e| format!("migration failed: {e}"))?;
    Ok(pool)
}

/// A migrated in-memory database for unit tests.
#[cfg(test)]
pub fn test_conn() -> Conn {
    use diesel::Connection;
    let mut conn = Conn::establish(":memory:").expect("in-memory sqlite");
    conn.run_pending_migrations(MIGRATIONS).expect("migrations");
    conn
}
