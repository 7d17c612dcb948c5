//! Storage: diesel schema, row types and one function per query, each taking `&mut Conn`.
//!
//! Two engines share one logical schema: SQLite (the default, one node) and PostgreSQL
//! (cluster mode, several nodes on one database). [`Conn`] is either; the pool reconnects by
//! itself, and while the database cannot be reached it answers at once with
//! [`StoreUnavailable`] (503 `backpressure`) instead of holding callers for its timeout.

pub mod cluster_queries;
mod conn;
pub mod fixed;
pub mod listing;
pub mod message_state;
#[cfg(test)]
pub mod pg_test;
pub mod queries;
pub mod rows;
pub mod schema;
pub mod wal_vfs;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::sqlite::SqliteConnection;
use diesel::Connection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub(crate) use conn::on_engine;
pub use conn::{AnyConnection, MultiBackend};

pub type Conn = AnyConnection;
pub type PooledConn = r2d2::PooledConnection<Manager>;

pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/sqlite");
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/postgres");

/// Which database, parsed from `sqlite://path` (or a bare path) or `postgres://…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite { path: String },
    Postgres { url: String },
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres {
                url: url.to_string(),
            });
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if path.is_empty() {
            return Err("empty database path".into());
        }
        Ok(Self::Sqlite {
            path: path.to_string(),
        })
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres { .. })
    }

    /// `sqlite` or `postgres`.
    pub fn engine(&self) -> &'static str {
        match self {
            Self::Sqlite { .. } => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        match self {
            Self::Sqlite { path } => path.clone(),
            Self::Postgres { url } => redact(url),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// How a commit reaches the disk (SQLite `synchronous` in WAL mode; PostgreSQL commits are
/// as durable as the server is configured).
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

/// The store cannot be reached (or is shutting down): callers answer 503 `backpressure`.
#[derive(Debug, Clone)]
pub struct StoreUnavailable(pub String);

impl std::fmt::Display for StoreUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "database unavailable: {}", self.0)
    }
}

impl std::error::Error for StoreUnavailable {}

impl From<StoreUnavailable> for crate::error::ApiError {
    fn from(e: StoreUnavailable) -> Self {
        log::warn!("{e}");
        Self::backpressure("the store is unreachable").retry_after(1)
    }
}

/// Opens connections of the configured engine for the pool (SQLite gets its pragmas), and
/// tells the pool's health when connecting fails or works again.
#[derive(Debug)]
pub struct Manager {
    url: DatabaseUrl,
    durability: Durability,
    health: Arc<Health>,
}

/// Whether the database is reachable, as the last connection attempts found it.
#[derive(Debug, Default)]
struct Health {
    /// Set when a connection attempt failed; cleared by the next one that works.
    down: AtomicBool,
    /// A thread is probing the database until it answers again.
    probing: AtomicBool,
}

/// Opens one connection of the engine `url` names, SQLite with its per-connection pragmas.
pub fn establish(url: &DatabaseUrl, durability: Durability) -> Result<Conn, StoreUnavailable> {
    match url {
        DatabaseUrl::Sqlite { path } => {
            // Every commit syncs: its WAL frames can go to the kernel in one write.
            let through_vfs = match durability {
                Durability::Full => wal_vfs::uri(path),
                Durability::Normal => None,
            };
            let mut conn = SqliteConnection::establish(through_vfs.as_deref().unwrap_or(path))
                .map_err(|e| StoreUnavailable(format!("cannot open {path}: {e}")))?;
            let synchronous = match durability {
                Durability::Full => "FULL",
                Durability::Normal => "NORMAL",
            };
            let vfs_pragmas = if through_vfs.is_some() {
                wal_vfs::PRAGMAS
            } else {
                ""
            };
            conn.batch_execute(&format!(
                // temp_store: savepoint sub-journals stay in memory instead of temp files
                // (one savepoint per write in a group commit).
                "PRAGMA busy_timeout = 5000; PRAGMA synchronous = {synchronous}; \
                 PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; {vfs_pragmas}"
            ))
            .map_err(|e| StoreUnavailable(format!("pragmas: {e}")))?;
            Ok(AnyConnection::Sqlite(conn))
        }
        DatabaseUrl::Postgres { url } => PgConnection::establish(url)
            .map(AnyConnection::Pg)
            .map_err(|e| StoreUnavailable(format!("{}: {e}", redact(url)))),
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = StoreUnavailable;

    fn connect(&self) -> Result<Conn, StoreUnavailable> {
        let result = establish(&self.url, self.durability);
        self.health.down.store(result.is_err(), Ordering::Release);
        result
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), StoreUnavailable> {
        conn.batch_execute("SELECT 1")
            .map_err(|e| StoreUnavailable(e.to_string()))
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        diesel::r2d2::R2D2Connection::is_broken(conn)
    }
}

/// A blocking task panicked or its runtime is shutting down.
#[derive(Debug)]
pub struct BlockingFailed;

impl std::fmt::Display for BlockingFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("blocking task failed")
    }
}

/// The connection pool of either engine. While the database is known to be unreachable,
/// [`DbPool::get`] fails at once (a thread probes it and clears the state when it answers),
/// so nothing waits for the pool's timeout on every call during an outage.
#[derive(Clone)]
pub struct DbPool {
    inner: r2d2::Pool<Manager>,
    url: Arc<DatabaseUrl>,
    durability: Durability,
    health: Arc<Health>,
    /// One permit per connection: work waiting for a connection waits here, as a task,
    /// instead of as a blocking thread (a reconnect storm once grew 512 of them).
    blocking_slots: Arc<tokio::sync::Semaphore>,
}

/// How often the prober tries the database while it is down.
const PROBE_EVERY: Duration = Duration::from_millis(250);

impl DbPool {
    /// A pooled connection, or at once [`StoreUnavailable`] while the database is down.
    pub fn get(&self) -> Result<PooledConn, StoreUnavailable> {
        if self.health.down.load(Ordering::Acquire) {
            self.start_probe();
            return Err(StoreUnavailable("the database is unreachable".into()));
        }
        match self.inner.get() {
            Ok(c) => Ok(c),
            Err(e) => {
                if self.health.down.load(Ordering::Acquire) {
                    self.start_probe();
                }
                Err(StoreUnavailable(e.to_string()))
            }
        }
    }

    /// Runs `f` (which takes a connection from this pool) on a blocking thread, at most as
    /// many at once as the pool has connections; the rest wait their turn in order.
    pub fn run_blocking<T, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, BlockingFailed>> + 'static
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let slots = self.blocking_slots.clone();
        async move {
            let _slot = slots.acquire_owned().await.map_err(|_| BlockingFailed)?;
            actix_web::rt::task::spawn_blocking(f)
                .await
                .map_err(|_| BlockingFailed)
        }
    }

    /// The database answered the last connection attempt (`/readyz`).
    pub fn is_up(&self) -> bool {
        !self.health.down.load(Ordering::Acquire)
    }

    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }

    pub fn is_postgres(&self) -> bool {
        self.url.is_postgres()
    }

    /// Connections open and idle (for tests and metrics).
    pub fn state(&self) -> r2d2::State {
        self.inner.state()
    }

    /// Probes the database on a thread of its own until a connection works again.
    fn start_probe(&self) {
        if self.health.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (url, durability, health) = (self.url.clone(), self.durability, self.health.clone());
        let spawned = std::thread::Builder::new()
            .name("db-probe".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(PROBE_EVERY);
                    if !health.down.load(Ordering::Acquire) || establish(&url, durability).is_ok() {
                        break;
                    }
                }
                log::info!("database {} is reachable again", url.redacted());
                health.down.store(false, Ordering::Release);
                health.probing.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.health.probing.store(false, Ordering::Release);
        }
    }
}

/// A write transaction: `BEGIN IMMEDIATE` on SQLite (the write lock is taken at once, so two
/// writers never deadlock upgrading a read lock), a plain `BEGIN` on PostgreSQL (writers lock
/// the rows they change; see the persistence actor). Nested `transaction` calls inside are
/// savepoints.
pub fn write_transaction<T, E, F>(conn: &mut Conn, f: F) -> Result<T, E>
where
    F: FnOnce(&mut Conn) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    match conn {
        AnyConnection::Sqlite(c) => {
            AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?
        }
        AnyConnection::Pg(c) => AnsiTransactionManager::begin_transaction_sql(c, "BEGIN")?,
    }
    type Tm = <Conn as Connection>::TransactionManager;
    match f(conn) {
        Ok(value) => {
            Tm::commit_transaction(conn)?;
            Ok(value)
        }
        Err(e) => match Tm::rollback_transaction(conn) {
            Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(e),
            Err(rollback) => Err(rollback.into()),
        },
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
    let mut builder = r2d2::Pool::builder().max_size(max_size);
    match url {
        DatabaseUrl::Sqlite { path } => {
            if let Some(parent) = std::path::Path::new(path).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
                }
            }
            // WAL is a property of the file: set it once, before the pool opens its
            // connections.
            let mut conn = SqliteConnection::establish(path)
                .map_err(|e| format!("cannot open database {path}: {e}"))?;
            conn.batch_execute("PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL;")
                .map_err(|e| format!("cannot enable WAL: {e}"))?;
            // No `SELECT 1` on every checkout (r2d2's default): a connection to a local file
            // does not go stale as a network one does, and the check was a statement parsed
            // and run before each read and each post (docs/performance.md, "2026-12-07,
            // 13:29–"). A failing connection still shows in the query it was taken for.
            builder = builder
                .connection_timeout(Duration::from_secs(5))
                .test_on_check_out(false);
        }
        DatabaseUrl::Postgres { .. } => {
            // Connections are opened as needed (a node need not hold max_size of the
            // server's connections while idle); a dead server is noticed within 3 s.
            builder = builder
                .min_idle(Some(2.min(max_size)))
                .connection_timeout(Duration::from_secs(3));
        }
    }
    let health = Arc::new(Health::default());
    let manager = Manager {
        url: url.clone(),
        durability,
        health: health.clone(),
    };
    let inner = builder
        .build(manager)
        .map_err(|e| format!("cannot open database {}: {e}", url.redacted()))?;
    let pool = DbPool {
        inner,
        url: Arc::new(url.clone()),
        durability,
        health,
        blocking_slots: Arc::new(tokio::sync::Semaphore::new(max_size as usize)),
    };
    let mut conn = pool
        .get()
        .map_err(|e| format!("cannot open database: {e}"))?;
    migrate(&mut conn)?;
    Ok(pool)
}

/// Runs the engine's pending migrations. On PostgreSQL nodes starting together take turns
/// under an advisory lock.
pub fn migrate(conn: &mut Conn) -> Result<(), String> {
    let failed = |e: &dyn std::fmt::Display| format!("migration failed: {e}");
    match conn {
        AnyConnection::Sqlite(c) => {
            c.run_pending_migrations(SQLITE_MIGRATIONS)
                .map_err(|e| failed(&e))?;
        }
        AnyConnection::Pg(c) => {
            c.batch_execute("SELECT pg_advisory_lock(7270601)")
                .map_err(|e| failed(&e))?;
            let ran = c.run_pending_migrations(POSTGRES_MIGRATIONS).map(|_| ());
            let unlocked = c.batch_execute("SELECT pg_advisory_unlock(7270601)");
            ran.map_err(|e| failed(&e))?;
            unlocked.map_err(|e| failed(&e))?;
        }
    }
    Ok(())
}

/// A migrated SQLite file in a fresh temporary directory, pooled, for unit tests; the
/// directory (and the database) goes when the returned `TempDir` is dropped.
#[cfg(test)]
pub fn test_pool(max_size: u32) -> (tempfile::TempDir, DbPool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = DatabaseUrl::parse(&format!("sqlite://{}/t.db", dir.path().display())).expect("url");
    let pool = open(&url, max_size).expect("open");
    (dir, pool)
}

/// Workspace "1" and the direct channel "c1" between alice and bob, for unit tests.
#[cfg(test)]
pub fn seed_direct_channel(conn: &mut Conn) -> crate::domain::channel::Channel {
    queries::insert_workspace(conn, &rows::WorkspaceRow::for_tests("1")).expect("workspace");
    let creator = crate::domain::entity::test_entity("alice", crate::domain::entity::Role::Member);
    let channel = crate::domain::channel::new_direct("c1".into(), "1".into(), &creator, "bob", "t")
        .expect("channel");
    queries::insert_channel(conn, &channel).expect("insert channel");
    channel
}

/// A migrated in-memory database for unit tests.
#[cfg(test)]
pub fn test_conn() -> Conn {
    let mut conn =
        AnyConnection::Sqlite(SqliteConnection::establish(":memory:").expect("in-memory sqlite"));
    migrate(&mut conn).expect("migrations");
    conn
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::test_pool;

    #[derive(diesel::QueryableByName)]
    struct Pragma {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        value: i32,
    }

    fn pragma(conn: &mut super::Conn, name: &str) -> i32 {
        use diesel::RunQueryDsl;
        diesel::sql_query(format!("SELECT {name} AS value FROM pragma_{name}"))
            .get_result::<Pragma>(conn)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .value
    }

    #[test]
    fn a_durable_sqlite_store_syncs_every_commit_and_never_spills_before_one() {
        // What the WAL VFS relies on (`wal_vfs`): every run of WAL writes ends in a sync.
        let (_dir, pool) = test_pool(2);
        let mut conn = pool.get().expect("conn");
        assert_eq!(pragma(&mut conn, "synchronous"), 2, "FULL");
        assert_eq!(pragma(&mut conn, "cache_spill"), 0, "OFF");
    }

    #[actix::test]
    async fn blocking_work_runs_at_most_one_per_connection_at_once() {
        let (_dir, pool) = test_pool(3);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks = (0..24).map(|i| {
            let (running, most, conn_pool) = (running.clone(), most.clone(), pool.clone());
            pool.run_blocking(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let conn = conn_pool.get().map(|_| ());
                std::thread::sleep(Duration::from_millis(10));
                running.fetch_sub(1, Ordering::SeqCst);
                conn.map(|_| i)
            })
        });
        let done = futures_util::future::join_all(tasks).await;
        let finished: Vec<usize> = done
            .into_iter()
            .map(|r| r.expect("ran").expect("got a connection"))
            .collect();
        assert_eq!(finished, (0..24).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }
}
