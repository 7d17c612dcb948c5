//! PersistenceActor: the one writer of a node. It drains whatever is queued into one
//! transaction (group commit), gives events their workspace cursors in commit order, answers
//! every writer after COMMIT, and only then hands the events to the broker for fan-out.
//!
//! It runs on its own OS thread so blocking diesel calls never stall the async workers; its
//! mailbox is a bounded channel, and a full mailbox is answered with `backpressure`.
//!
//! Several nodes may write one database (PostgreSQL in cluster mode, or one SQLite file).
//! On SQLite the batch's `BEGIN IMMEDIATE` takes the database's write lock. On PostgreSQL the
//! batch first locks the rows of the channels and then of the workspaces it touches, each
//! set in id order (`SELECT … ORDER BY id FOR UPDATE`), so two nodes never deadlock on them
//! and wait for each other instead. Under those locks every write's seqs are checked against
//! the committed `last_seq` (a write whose seqs do not follow is refused with
//! [`WriteError::StaleSeq`]: another node wrote the channel, and its ChannelActor reloads
//! and retries), and cursors are allocated from the committed `last_cursor`, so they are
//! dense and in commit order across nodes.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, Connection, TransactionManager};
use tokio::sync::oneshot;

use crate::broker::Broker;
use crate::domain::event::{Event, EventDraft, LiveRoute};
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::store::message_state::{PendingState, StateWrite};
use crate::store::rows::{EventRow, VersionRow};
use crate::store::{queries, AnyConnection, Conn, DbPool, PooledConn};

/// The database change of one write: runs inside its own savepoint. Returning `Ok(false)`
/// commits the change but drops the write's events (an idempotent no-op, say).
pub type Apply = Box<dyn FnOnce(&mut Conn) -> ApiResult<bool> + Send>;

/// Builds a write again on another first seq, inside the batch transaction: its change and
/// its events. For writes that build on no earlier write of their chain (a new post): when
/// their seqs went stale (another node wrote the channel) the writer rebuilds them on the next
/// free seq instead of refusing them.
pub type Rebase = Box<dyn FnOnce(&mut Conn, i64) -> ApiResult<(Apply, Vec<EventDraft>)> + Send>;

/// The channel seqs a write takes: `first..=last` must follow the committed `last_seq` of
/// the channel exactly, so seqs stay contiguous.
pub struct ChannelSeqs {
    pub channel_id: String,
    pub first: i64,
    pub last: i64,
    /// The pipeline of writes this one builds on (see [`SeqChain`]).
    pub chain: Option<SeqChain>,
    /// How to build it on other seqs should these be stale (see [`Rebase`]).
    pub rebase: Option<Rebase>,
}

impl ChannelSeqs {
    pub fn new(channel_id: String, first: i64, last: i64) -> Self {
        Self {
            channel_id,
            first,
            last,
            chain: None,
            rebase: None,
        }
    }
}

/// The writes a ChannelActor pipelines on one view of its channel: each builds on the ones
/// before it (seqs, message states). Once one of them is refused or fails, the writer
/// refuses the rest of the chain, even should their seqs happen to follow what another node
/// committed meanwhile. The actor starts a new chain when it reloads.
#[derive(Clone, Default, Debug)]
pub struct SeqChain(Arc<AtomicBool>);

impl SeqChain {
    pub fn is_broken(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn break_chain(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// One write: its change, the channel seqs it takes, and the events it emits.
pub struct Write {
    pub workspace_id: String,
    /// Set when the write takes channel seqs.
    pub channel_seqs: Option<ChannelSeqs>,
    pub apply: Apply,
    pub events: Vec<EventDraft>,
    /// The message version this write makes, written by the writer rather than by `apply`
    /// (which must then not touch that message's row). Boxed: the queue's slots stay small.
    pub version: Option<Box<VersionWrite>>,
    /// `false` when `apply` and the inserts cannot fail once the seqs are checked (inserts
    /// under keys only the writer allocates): the write then runs without a savepoint, its
    /// rows are inserted with the batch's others, and should it fail anyway, the whole batch
    /// fails instead of this write.
    pub savepoint: bool,
}

/// A version of a message: its row, and the message's state after it. The state is saved
/// once per message per batch, the batch's versions folded in order — a batch commits
/// atomically, so nobody sees the states in between (a stream's appends in one batch extend
/// its text once).
pub struct VersionWrite {
    pub row: VersionRow,
    pub state: StateWrite,
}

impl Write {
    /// A write in its own savepoint, without a message version.
    pub fn new(
        workspace_id: String,
        channel_seqs: Option<ChannelSeqs>,
        apply: Apply,
        events: Vec<EventDraft>,
    ) -> Self {
        Self {
            workspace_id,
            channel_seqs,
            apply,
            events,
            version: None,
            savepoint: true,
        }
    }
}

/// What a writer gets back after COMMIT: its events with their cursors.
pub type WriteResult = ApiResult<Vec<Arc<Event>>>;

/// Why a write did not commit, for the writers that can do something about it.
#[derive(Debug, Clone)]
pub enum WriteError {
    /// Its seqs do not follow the channel's committed ones (another node wrote the channel,
    /// or an earlier write of its chain failed). Nothing of it was written: reload, retry.
    StaleSeq { committed: i64 },
    /// The write itself was refused (its change returned an error); nothing of it written.
    Refused(ApiError),
    /// The whole batch failed (the store is unreachable, a conflict between nodes, …);
    /// nothing of it was written. Answered to clients as 503 `backpressure`.
    BatchFailed(ApiError),
}

impl WriteError {
    pub fn into_api(self) -> ApiError {
        match self {
            Self::StaleSeq { .. } => {
                ApiError::backpressure("the channel's write order was interrupted; retry")
                    .retry_after(1)
            }
            Self::Refused(e) | Self::BatchFailed(e) => e,
        }
    }

    /// Worth retrying after the channel reloaded its state from the store.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::StaleSeq { .. } | Self::BatchFailed(_))
    }
}

/// [`WriteResult`] with the reason of a failure.
pub type TypedWriteResult = Result<Vec<Arc<Event>>, WriteError>;

type Reply = oneshot::Sender<TypedWriteResult>;

enum Command {
    /// A write, its reply, and when it was queued.
    Write(Write, Reply, Instant),
    /// Answered once everything queued before it has committed.
    Flush(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct Persistence {
    tx: SyncSender<Command>,
}

/// How the persistence thread is tuned.
#[derive(Debug, Clone)]
pub struct PersistenceConfig {
    pub queue_capacity: usize,
    pub max_batch: usize,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 65_536,
            max_batch: 2_048,
        }
    }
}

impl Persistence {
    /// Starts the writer thread on a connection of its own.
    pub fn start(
        pool: &DbPool,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        config: PersistenceConfig,
    ) -> Result<(Self, JoinHandle<()>), String> {
        let mut conn = pool
            .get()
            .map_err(|e| format!("persistence connection: {e}"))?;
        // The checkpointer copies the WAL off this thread; the writer's own, rarer
        // checkpoint lets the WAL start over (`crate::checkpointer`).
        if !pool.is_postgres() {
            use diesel::connection::SimpleConnection;
            // A batch of hundreds of writes must not spill dirty pages mid-transaction: the
            // writer alone gets a 32 MiB page cache (readers keep the 2 MiB default).
            conn.batch_execute(&format!(
                "PRAGMA wal_autocheckpoint = {}; PRAGMA cache_size = -32768;",
                crate::checkpointer::WRITER_CHECKPOINT_PAGES
            ))
            .map_err(|e| format!("persistence connection: {e}"))?;
        }
        let checkpointer = crate::checkpointer::start(pool)?;
        let (tx, rx) = sync_channel(config.queue_capacity);
        let pool = pool.clone();
        let handle = std::thread::Builder::new()
            .name("persistence".into())
            .spawn(move || {
                Writer {
                    conn: Some(conn),
                    pool,
                    broker,
                    metrics,
                    max_batch: config.max_batch,
                }
                .run(rx);
                // Dropping the sender stops the checkpointer after a last checkpoint.
                drop(checkpointer);
            })
            .map_err(|e| format!("persistence thread: {e}"))?;
        Ok((Self { tx }, handle))
    }

    /// Queues a write now (writes commit in the order they are queued) and returns a
    /// future of its commit, with the reason should it fail.
    pub fn enqueue_typed(
        &self,
        mut write: Write,
    ) -> impl std::future::Future<Output = TypedWriteResult> + 'static {
        // Serialized here, on the caller's thread: the one writer thread serializes all
        // writes, so what can be done before it is done before it.
        for draft in &mut write.events {
            if draft.payload_text.is_none() {
                draft.payload_text = serde_json::to_string(&draft.payload).ok();
            }
        }
        let (reply, rx) = oneshot::channel();
        let queued = match self
            .tx
            .try_send(Command::Write(write, reply, Instant::now()))
        {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(WriteError::BatchFailed(
                ApiError::backpressure("the write queue is full").retry_after(1),
            )),
            Err(TrySendError::Disconnected(_)) => Err(WriteError::BatchFailed(
                ApiError::backpressure("the store is shutting down"),
            )),
        };
        async move {
            queued?.await.unwrap_or_else(|_| {
                Err(WriteError::BatchFailed(ApiError::backpressure(
                    "the store is shutting down",
                )))
            })
        }
    }

    /// Queues a write now (writes commit in the order they are queued) and returns a
    /// future of its commit.
    pub fn enqueue(
        &self,
        write: Write,
    ) -> impl std::future::Future<Output = WriteResult> + 'static {
        let typed = self.enqueue_typed(write);
        async move { typed.await.map_err(WriteError::into_api) }
    }

    /// Queues a write and waits for its commit.
    pub async fn write(&self, write: Write) -> WriteResult {
        self.enqueue(write).await
    }

    /// Waits until everything queued so far has committed.
    pub async fn flush(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(reply)).is_ok() {
            let _ = rx.await;
        }
    }
}

struct Writer {
    /// The writer's connection; `None` after a PostgreSQL batch failed (the connection may
    /// be dead), taken again from the pool for the next batch.
    conn: Option<PooledConn>,
    pool: DbPool,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    max_batch: usize,
}

/// An event as stored, with its payload still as a value (not parsed back from the row).
type StagedEvent = (EventRow, serde_json::Value);

/// One write of a batch after its savepoint: its drafts with cursors, or its error.
type Staged = (
    Reply,
    Result<Vec<StagedEvent>, WriteError>,
    Vec<(Option<Arc<[String]>>, LiveRoute)>,
);

/// How many times a PostgreSQL batch retries taking its row locks after a deadlock or
/// serialization failure (nothing of the batch has run yet then).
const LOCK_ATTEMPTS: u32 = 5;

impl Writer {
    fn run(mut self, rx: Receiver<Command>) {
        loop {
            let first = match rx.recv_timeout(Duration::from_secs(3600)) {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut writes = Vec::new();
            let mut flushes = Vec::new();
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Write(w, reply, queued) => {
                        self.metrics.observe_queue_wait(queued.elapsed());
                        writes.push((w, reply));
                    }
                    Command::Flush(reply) => flushes.push(reply),
                }
                if writes.len() < self.max_batch {
                    next = rx.try_recv().ok();
                }
            }
            if !writes.is_empty() {
                // A bug must not take the only writer down with it: its batch fails, the
                // writers are told, and the next batch goes on.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.commit_batch(writes)
                }));
                if outcome.is_err() {
                    log::error!("persistence batch panicked; its writes were not acknowledged");
                    // The connection may be left inside a transaction.
                    self.conn = None;
                }
            }
            for f in flushes {
                let _ = f.send(());
            }
        }
    }

    fn commit_batch(&mut self, writes: Vec<(Write, Reply)>) {
        let started = Instant::now();
        let n = writes.len();
        let chains: Vec<SeqChain> = writes
            .iter()
            .filter_map(|(w, _)| w.channel_seqs.as_ref().and_then(|s| s.chain.clone()))
            .collect();
        let fail_all = |staged: Vec<Staged>, rest: Vec<(Write, Reply)>, why: &str| {
            for c in &chains {
                c.break_chain();
            }
            let err = ApiError::backpressure(why.to_string()).retry_after(1);
            let replies = staged
                .into_iter()
                .map(|(r, _, _)| r)
                .chain(rest.into_iter().map(|(_, r)| r));
            for reply in replies {
                let _ = reply.send(Err(WriteError::BatchFailed(err.clone())));
            }
        };
        if self.conn.is_none() {
            match self.pool.get() {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    log::warn!("group commit of {n} writes: {e}");
                    fail_all(Vec::new(), writes, "the store is unreachable");
                    return;
                }
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let conn: &mut Conn = conn;
        if let Err(e) = begin_batch(conn, &writes) {
            log::error!("group commit of {n} writes could not begin: {e}");
            self.metrics.observe_batch(n, started.elapsed());
            fail_all(Vec::new(), writes, "the store could not commit the write");
            self.drop_conn_after_failure();
            return;
        }
        let mut staged: Vec<Staged> = Vec::with_capacity(n);
        let mut pending = writes.into_iter();
        let mut rebased = 0u64;
        let body = run_batch(conn, &mut pending, &mut staged, &mut rebased);
        self.metrics.rebased_writes.inc_by(rebased);
        let stale = staged
            .iter()
            .filter(|(_, r, _)| matches!(r, Err(WriteError::StaleSeq { .. })))
            .count();
        self.metrics.stale_seq_refusals.inc_by(stale as u64);
        type Tm = <Conn as Connection>::TransactionManager;
        let outcome = match body {
            Ok(()) => Tm::commit_transaction(conn).map_err(ApiError::from),
            Err(e) => {
                if let Err(r) = Tm::rollback_transaction(conn) {
                    log::warn!("rollback failed: {r}");
                }
                Err(e)
            }
        };
        self.metrics.observe_batch(n, started.elapsed());
        if let Err(e) = outcome {
            log::error!("group commit of {n} writes failed: {e}");
            fail_all(
                staged,
                pending.collect(),
                "the store could not commit the write",
            );
            self.drop_conn_after_failure();
            return;
        }
        let event_count = staged
            .iter()
            .map(|(_, r, _)| r.as_ref().map_or(0, Vec::len))
            .sum();
        let mut committed: Vec<Arc<Event>> = Vec::with_capacity(event_count);
        let mut replies = Vec::with_capacity(staged.len());
        for (reply, result, recipients) in staged {
            let result = result.map(|rows| {
                rows.into_iter()
                    .zip(recipients)
                    .map(|((row, payload), (r, live))| {
                        // The frame splices the payload text the row already holds.
                        let mut ev = Event::stored_unshared(
                            row.id,
                            row.cursor,
                            row.event_type,
                            row.workspace_id,
                            row.channel_id,
                            row.seq,
                            row.created_at,
                            &row.payload,
                            payload,
                        );
                        ev.recipients = r;
                        ev.live = live;
                        let ev = Arc::new(ev);
                        committed.push(ev.clone());
                        ev
                    })
                    .collect()
            });
            replies.push((reply, result));
        }
        if !committed.is_empty() {
            self.broker.publish(committed);
        }
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
    }

    /// A PostgreSQL connection that failed a batch may be dead: the next batch takes one
    /// from the pool (which tests it). SQLite keeps its tuned connection.
    fn drop_conn_after_failure(&mut self) {
        if self.pool.is_postgres() {
            self.conn = None;
        }
    }
}

/// Begins the batch's transaction: `BEGIN IMMEDIATE` on SQLite; on PostgreSQL `BEGIN` and
/// the row locks of the channels, then the workspaces, the batch touches, each in id order.
/// Nothing of the batch has run yet, so a deadlock or serialization failure while locking
/// is retried here.
fn begin_batch(conn: &mut Conn, writes: &[(Write, Reply)]) -> diesel::QueryResult<()> {
    let c = match conn {
        AnyConnection::Sqlite(c) => {
            return AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE");
        }
        AnyConnection::Pg(c) => c,
    };
    let mut channels: BTreeSet<&str> = BTreeSet::new();
    let mut workspaces: BTreeSet<&str> = BTreeSet::new();
    for (w, _) in writes {
        workspaces.insert(&w.workspace_id);
        if let Some(s) = &w.channel_seqs {
            channels.insert(&s.channel_id);
        }
        for e in &w.events {
            if let Some(ch) = &e.channel_id {
                channels.insert(ch);
            }
        }
    }
    let channels: Vec<&str> = channels.into_iter().collect();
    let workspaces: Vec<&str> = workspaces.into_iter().collect();
    let mut attempt = 0;
    loop {
        attempt += 1;
        AnsiTransactionManager::begin_transaction_sql(&mut *c, "BEGIN")?;
        let locked = queries::lock_channels_pg(c, &channels)
            .and_then(|_| queries::lock_workspaces_pg(c, &workspaces));
        match locked {
            Ok(()) => return Ok(()),
            Err(e) => {
                let _ = <diesel::pg::PgConnection as Connection>::TransactionManager::rollback_transaction(c);
                if attempt >= LOCK_ATTEMPTS || !is_transient(&e) {
                    return Err(e);
                }
                log::info!("batch locks conflicted ({e}); retrying");
                std::thread::sleep(Duration::from_millis(2 * u64::from(attempt)));
            }
        }
    }
}

/// A deadlock or serialization failure: the same transaction may succeed when retried.
pub fn is_transient(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    match e {
        Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
        Error::DatabaseError(_, info) => {
            let m = info.message();
            m.contains("deadlock detected") || m.contains("could not serialize")
        }
        _ => false,
    }
}

/// Runs the writes of a batch inside its transaction. A write that fails alone (its seqs, its
/// change) is staged with its error; an error returned here fails the whole batch (the
/// writes still `pending` are answered by the caller).
fn run_batch(
    conn: &mut Conn,
    pending: &mut std::vec::IntoIter<(Write, Reply)>,
    staged: &mut Vec<Staged>,
    rebased: &mut u64,
) -> ApiResult<()> {
    let mut batch = Batch {
        stamp: crate::ids::now_rfc3339(),
        cursors: HashMap::new(),
        seqs: HashMap::new(),
        deferred: Deferred::with_capacity(pending.len()),
    };
    for (write, reply) in pending.by_ref() {
        let chain = write.channel_seqs.as_ref().and_then(|s| s.chain.clone());
        let write = match rebase_if_stale(conn, write, &batch.seqs, rebased) {
            Ok(w) => w,
            Err(e) => {
                if let Some(c) = &chain {
                    c.break_chain();
                }
                staged.push((reply, Err(e), Vec::new()));
                continue;
            }
        };
        let recipients: Vec<(Option<Arc<[String]>>, LiveRoute)> = write
            .events
            .iter()
            .map(|e| (e.recipients.clone(), e.live.clone()))
            .collect();
        if write.version.is_none() {
            // Its change may read or write message rows: they must be current.
            batch.deferred.flush(conn, staged)?;
        }
        let index = staged.len();
        let chain = write.channel_seqs.as_ref().and_then(|s| s.chain.clone());
        let result = match check_seqs(conn, &write, &batch.seqs) {
            Err(e) => Err(e),
            Ok(()) if write.savepoint => conn
                .transaction::<_, ApiError, _>(|conn| stage_write(conn, write, &mut batch, None))
                .map_err(WriteError::Refused),
            Ok(()) => {
                match stage_write(conn, write, &mut batch, Some(index)) {
                    // No savepoint can undo its partial change: the batch goes.
                    Err(e) => {
                        log::error!("a write without savepoint failed: {e}");
                        staged.push((reply, Err(WriteError::Refused(e.clone())), recipients));
                        return Err(e);
                    }
                    Ok(rows) => Ok(rows),
                }
            }
        };
        if let Err(e) = &result {
            // The writes after it in its chain build on it: they are refused too.
            if let Some(c) = &chain {
                c.break_chain();
            }
            if let WriteError::Refused(e) = e {
                if e.code == crate::error::ErrorCode::InternalError {
                    log::warn!("write rolled back: {e}");
                }
            }
        }
        staged.push((reply, result, recipients));
    }
    batch.deferred.flush(conn, staged)?;
    for (ws, last) in &batch.cursors {
        queries::set_workspace_last_cursor(conn, ws, *last)?;
    }
    for (channel, last) in &batch.seqs {
        queries::set_channel_last_seq(conn, channel, *last)?;
    }
    Ok(())
}

/// What a batch's writes share while it runs.
struct Batch {
    /// The `created_at` of the batch's events: they commit together, and stamps stay in
    /// cursor order (pruning by age relies on it).
    stamp: String,
    /// The last cursor given out per workspace.
    cursors: HashMap<String, i64>,
    /// The last seq taken per channel.
    seqs: HashMap<String, i64>,
    deferred: Deferred,
}

/// What the batch's writes left to write: the version and event rows of writes without
/// savepoint, inserted together, and messages' latest states by (channel, serial), the last
/// one winning.
#[derive(Default)]
struct Deferred {
    versions: Vec<VersionRow>,
    /// Indices of staged writes whose event rows are still to insert.
    events: Vec<usize>,
    /// By channel, then message serial: looked up by `&str`, a write's key is copied only
    /// the first time its message is seen in the batch.
    states: HashMap<String, HashMap<String, PendingState>>,
    /// The stored text of each recipient list seen in the batch: a channel's events share
    /// one list (`Arc`) while its members stay the same, so it is built once per batch. The
    /// key is the list's address, kept valid by the `Arc` held beside the text.
    recipient_texts: HashMap<usize, (Arc<[String]>, String)>,
}

impl Deferred {
    /// A batch sized for `writes` writes.
    fn with_capacity(writes: usize) -> Self {
        Self {
            versions: Vec::with_capacity(writes),
            events: Vec::with_capacity(writes),
            ..Self::default()
        }
    }

    fn defer_state(&mut self, s: StateWrite) {
        let (channel, serial) = s.key();
        if let Some(earlier) = self.states.get_mut(channel).and_then(|m| m.get_mut(serial)) {
            earlier.absorb(s);
            return;
        }
        let (channel, serial) = (channel.to_string(), serial.to_string());
        self.states
            .entry(channel)
            .or_default()
            .insert(serial, PendingState::from(s));
    }

    fn recipients_text(&mut self, recipients: &Arc<[String]>) -> String {
        let key = Arc::as_ptr(recipients) as *const String as usize;
        let (_, text) = self.recipient_texts.entry(key).or_insert_with(|| {
            let text = crate::store::rows::recipients_text(recipients);
            (recipients.clone(), text)
        });
        text.clone()
    }

    /// Writes everything waiting (inside the batch transaction, outside any savepoint).
    fn flush(&mut self, conn: &mut Conn, staged: &[Staged]) -> ApiResult<()> {
        let versions: Vec<&VersionRow> = self.versions.iter().collect();
        queries::insert_versions(conn, &versions)?;
        self.versions.clear();
        let events: Vec<&EventRow> = self
            .events
            .drain(..)
            .filter_map(|i| staged.get(i).and_then(|(_, r, _)| r.as_ref().ok()))
            .flatten()
            .map(|(row, _)| row)
            .collect();
        queries::insert_events(conn, &events)?;
        for (_, messages) in self.states.drain() {
            for state in messages.values() {
                state.save(conn)?;
            }
        }
        Ok(())
    }
}

/// A write that can be rebuilt ([`Rebase`]) and whose seqs are stale, or whose chain broke,
/// is rebuilt on the seqs that follow the committed ones; it then leaves its chain (whose
/// later writes are stale: the chain is broken for them).
fn rebase_if_stale(
    conn: &mut Conn,
    mut write: Write,
    seqs: &HashMap<String, i64>,
    rebased: &mut u64,
) -> Result<Write, WriteError> {
    let Some(s) = write.channel_seqs.as_mut() else {
        return Ok(write);
    };
    let Some(rebase) = s.rebase.take() else {
        return Ok(write);
    };
    let committed = match seqs.get(&s.channel_id) {
        Some(c) => *c,
        None => queries::channel_last_seq(conn, &s.channel_id)
            .map_err(|e| WriteError::Refused(e.into()))?,
    };
    let broken = s.chain.as_ref().is_some_and(SeqChain::is_broken);
    if s.first == committed + 1 && !broken {
        return Ok(write);
    }
    let first = committed + 1;
    let (apply, events) = rebase(conn, first).map_err(WriteError::Refused)?;
    *rebased += 1;
    log::info!(
        "rebased a write on {} from seq {} to {first}",
        s.channel_id,
        s.first
    );
    s.last = first + (s.last - s.first);
    s.first = first;
    if let Some(chain) = s.chain.take() {
        chain.break_chain();
    }
    write.apply = apply;
    write.events = events;
    Ok(write)
}

/// Refuses a write whose seqs do not follow its channel's committed ones (read under the
/// batch's lock), or whose chain broke, before any change.
fn check_seqs(
    conn: &mut Conn,
    write: &Write,
    seqs: &HashMap<String, i64>,
) -> Result<(), WriteError> {
    let Some(s) = &write.channel_seqs else {
        return Ok(());
    };
    let committed = match seqs.get(&s.channel_id) {
        Some(c) => *c,
        None => queries::channel_last_seq(conn, &s.channel_id)
            .map_err(|e| WriteError::Refused(e.into()))?,
    };
    if s.chain.as_ref().is_some_and(SeqChain::is_broken) {
        return Err(WriteError::StaleSeq { committed });
    }
    if s.first != committed + 1 || s.last < s.first {
        log::info!(
            "stale seqs on {}: committed {committed}, got {}..{}",
            s.channel_id,
            s.first,
            s.last
        );
        return Err(WriteError::StaleSeq { committed });
    }
    Ok(())
}

/// Applies one write whose seqs were checked: runs its change, writes its version, defers
/// its message state and stages its events with the next cursors of its workspace. With
/// `deferred_at` (its index among the staged writes) its rows wait in `deferred` instead.
fn stage_write(
    conn: &mut Conn,
    write: Write,
    batch: &mut Batch,
    deferred_at: Option<usize>,
) -> ApiResult<Vec<StagedEvent>> {
    let Batch {
        stamp,
        cursors,
        seqs,
        deferred,
    } = batch;
    let keep_events = (write.apply)(conn)?;
    let mut state = None;
    if let Some(v) = write.version {
        let VersionWrite { row, state: s } = *v;
        match deferred_at {
            Some(_) => deferred.versions.push(row),
            None => {
                queries::insert_version(conn, &row)?;
            }
        }
        state = Some(s);
    }
    let mut rows = Vec::with_capacity(write.events.len());
    if keep_events && !write.events.is_empty() {
        let mut next = match cursors.get(&write.workspace_id) {
            Some(c) => *c,
            None => queries::workspace_cursor_state(conn, &write.workspace_id)?.0,
        };
        for draft in write.events {
            next += 1;
            let row = EventRow {
                workspace_id: write.workspace_id.clone(),
                cursor: next,
                id: crate::ids::new_event_id(),
                event_type: draft.event_type.to_string(),
                channel_id: draft.channel_id,
                seq: draft.seq,
                payload: match draft.payload_text {
                    Some(text) => text,
                    // A write rebuilt in the writer (`Rebase`) brings new drafts.
                    None => serde_json::to_string(&draft.payload).map_err(ApiError::internal)?,
                },
                is_private: draft.recipients.is_some(),
                created_at: stamp.to_string(),
                recipients: draft
                    .recipients
                    .as_ref()
                    .map(|r| deferred.recipients_text(r)),
            };
            if deferred_at.is_none() {
                queries::insert_event(conn, &row)?;
            }
            rows.push((row, draft.payload));
        }
        match cursors.get_mut(&write.workspace_id) {
            Some(c) => *c = next,
            None => {
                cursors.insert(write.workspace_id.clone(), next);
            }
        }
    }
    if let Some(s) = write.channel_seqs {
        seqs.insert(s.channel_id, s.last);
    }
    if let Some(i) = deferred_at.filter(|_| !rows.is_empty()) {
        deferred.events.push(i);
    }
    // Last: nothing after this can fail, so a rolled-back write never leaves its state.
    if let Some(s) = state {
        deferred.defer_state(s);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<i64>>);

    impl Broker for Recorder {
        fn publish(&self, events: Vec<Arc<Event>>) {
            if let Ok(mut v) = self.0.lock() {
                v.extend(events.iter().filter_map(|e| e.cursor));
            }
        }
        fn publish_ephemeral(&self, _: Arc<Event>) {}
    }

    /// Workspace "1" and the direct channel "c1" (alice and bob).
    fn seed(pool: &DbPool) {
        crate::store::seed_direct_channel(&mut pool.get().expect("conn"));
    }

    fn setup() -> (tempfile::TempDir, DbPool, Persistence, Arc<Recorder>) {
        let (dir, pool) = crate::store::test_pool(4);
        seed(&pool);
        let recorder = Arc::new(Recorder::default());
        let (p, _) = Persistence::start(
            &pool,
            recorder.clone(),
            Arc::new(Metrics::new()),
            PersistenceConfig::default(),
        )
        .expect("start");
        (dir, pool, p, recorder)
    }

    fn seq_write(seq: i64) -> Write {
        Write {
            workspace_id: "1".into(),
            channel_seqs: Some(ChannelSeqs::new("c1".into(), seq, seq)),
            apply: Box::new(|_| Ok(true)),
            events: vec![EventDraft::new("message.created", serde_json::json!({}))
                .channel("c1")
                .seq(seq)],
            version: None,
            savepoint: true,
        }
    }

    #[actix::test]
    async fn concurrent_writes_commit_with_dense_cursors_in_order() {
        let (_dir, pool, p, recorder) = setup();
        let futures: Vec<_> = (1..=200).map(|s| p.write(seq_write(s))).collect();
        let results = futures_util::future::join_all(futures).await;
        let cursors: Vec<i64> = results
            .into_iter()
            .map(|r| {
                r.expect("committed")
                    .first()
                    .and_then(|e| e.cursor)
                    .expect("cursor")
            })
            .collect();
        assert_eq!(cursors, (1..=200).collect::<Vec<_>>());
        assert_eq!(
            *recorder.0.lock().expect("lock"),
            (1..=200).collect::<Vec<_>>(),
            "published in commit order"
        );
        let mut conn = pool.get().expect("conn");
        assert_eq!(
            queries::channel_last_seq(&mut conn, "c1").expect("seq"),
            200
        );
    }

    #[actix::test]
    async fn a_seq_that_does_not_follow_is_refused_and_changes_nothing() {
        let (_dir, pool, p, recorder) = setup();
        p.write(seq_write(1)).await.expect("first");
        let err = p.write(seq_write(3)).await.expect_err("gap");
        assert_eq!(err.code, crate::error::ErrorCode::Backpressure);
        let failing = Write {
            apply: Box::new(|_| Err(ApiError::conflict("no"))),
            ..seq_write(2)
        };
        assert_eq!(
            p.write(failing).await.expect_err("conflict").code,
            crate::error::ErrorCode::Conflict
        );
        p.write(seq_write(2)).await.expect("2 still follows 1");
        let mut conn = pool.get().expect("conn");
        assert_eq!(queries::channel_last_seq(&mut conn, "c1").expect("seq"), 2);
        assert_eq!(
            queries::workspace_cursor_state(&mut conn, "1")
                .expect("cursor")
                .0,
            2,
            "no cursor consumed by failures"
        );
        assert_eq!(*recorder.0.lock().expect("lock"), vec![1, 2]);
    }

    /// A version of `message` written without a savepoint, as appends are.
    fn state_write(seq: i64, message: &crate::domain::message::Message) -> Write {
        versioned_write(seq, StateWrite::Full(Box::new(message.clone())))
    }

    /// A version without savepoint leaving `state`.
    fn versioned_write(seq: i64, state: StateWrite) -> Write {
        let serial = state.key().1.to_string();
        let row = VersionRow {
            channel_id: "c1".into(),
            seq,
            message_serial: serial,
            action: "append".into(),
            actor: None,
            op_id: None,
            body: "{}".into(),
            created_at: "t".into(),
            fingerprint: None,
        };
        Write {
            version: Some(Box::new(VersionWrite { row, state })),
            savepoint: false,
            ..seq_write(seq)
        }
    }

    #[actix::test]
    async fn deferred_states_save_the_last_one_before_a_write_without_state_runs() {
        let (_dir, pool, p, _) = setup();
        let mut message = crate::domain::message::NewMessage {
            data: Some(serde_json::json!("")),
            ..Default::default()
        }
        .into_message("c1", "alice", 1, "t");
        queries::insert_message(&mut pool.get().expect("conn"), &message, "1").expect("insert");
        let mut futures = Vec::new();
        for seq in 1..=3 {
            message.data = serde_json::json!("x".repeat(seq as usize));
            futures.push(p.enqueue(state_write(seq, &message)));
        }
        // A write without state sees the row as the writes before it left it.
        let seen = Arc::new(Mutex::new(String::new()));
        let reader = seen.clone();
        futures.push(p.enqueue(Write {
            apply: Box::new(move |conn| {
                let m = queries::message(conn, "c1", &crate::ids::message_serial(1))?;
                if let (Ok(mut s), Some(m)) = (reader.lock(), m) {
                    *s = m.data.as_str().unwrap_or_default().to_string();
                }
                Ok(true)
            }),
            ..seq_write(4)
        }));
        message.data = serde_json::json!("xxxxx");
        futures.push(p.enqueue(state_write(5, &message)));
        for r in futures_util::future::join_all(futures).await {
            r.expect("committed");
        }
        assert_eq!(*seen.lock().expect("lock"), "xxx");
        let stored = queries::message(
            &mut pool.get().expect("conn"),
            "c1",
            &message.message_serial,
        )
        .expect("read")
        .expect("message");
        assert_eq!(stored.data, serde_json::json!("xxxxx"));
    }

    /// Appends sent as deltas (one batch or several, around a whole state) leave the text and
    /// counters the whole states would have: the stored JSON stays valid whatever the
    /// fragments hold.
    async fn appends_extend_the_stored_text(pool: &DbPool, p: &Persistence) {
        use crate::domain::message::{NewMessage, StreamStatus};
        use crate::store::message_state::AppendDelta;
        let mut conn = pool.get().expect("conn");
        let texts = [Some(serde_json::json!("")), None];
        let mut serials = Vec::new();
        for (i, data) in texts.iter().enumerate() {
            let mut m = NewMessage {
                data: data.clone(),
                content_ref: Some("ref".into()),
                ..Default::default()
            }
            .into_message("c1", "alice", i as i64 + 1, "t");
            m.data = data.clone().unwrap_or(serde_json::Value::Null);
            queries::insert_message(&mut conn, &m, "1").expect("insert");
            serials.push(m);
        }
        drop(conn);
        let fragments = [
            "plain ",
            "\"quoted\" ",
            "back\\slash\n",
            "é ✓ 😀",
            "\u{1}end",
        ];
        let mut seq = 0;
        let mut futures = Vec::new();
        for (n, fragment) in fragments.iter().enumerate() {
            for m in &serials {
                seq += 1;
                let delta = AppendDelta {
                    channel_id: "c1".into(),
                    message_serial: m.message_serial.clone(),
                    fragment: fragment.to_string(),
                    version_serial: crate::ids::version_serial(seq),
                    updated_at: format!("t{seq}"),
                    append_count: n as i64 + 1,
                    stream_status: StreamStatus::Open,
                    extras: (n == 1).then(|| serde_json::json!({"k": "v"})),
                    writes_text: true,
                };
                futures.push(p.enqueue(versioned_write(seq, StateWrite::Append(delta))));
            }
            if n == 2 {
                // Some in later batches than others.
                for r in futures_util::future::join_all(std::mem::take(&mut futures)).await {
                    r.expect("committed");
                }
            }
        }
        for r in futures_util::future::join_all(futures).await {
            r.expect("committed");
        }
        let whole: String = fragments.concat();
        let mut conn = pool.get().expect("conn");
        for m in &serials {
            let stored = queries::message(&mut conn, "c1", &m.message_serial)
                .expect("read")
                .expect("message");
            assert_eq!(stored.data, serde_json::json!(whole));
            assert_eq!(stored.append_count, fragments.len() as i64);
            assert_eq!(stored.stream_status, StreamStatus::Open);
            assert_eq!(stored.extras, serde_json::json!({"k": "v"}));
            assert_eq!(stored.last_action, "append");
            assert_eq!(stored.last_append_at, Some(stored.updated_at.clone()));
        }
    }

    #[actix::test]
    async fn appends_as_deltas_extend_the_stored_text_sqlite() {
        let (_dir, pool, p, _) = setup();
        appends_extend_the_stored_text(&pool, &p).await;
    }

    #[actix::test]
    async fn appends_as_deltas_extend_the_stored_text_postgres() {
        let (_db, pool) = pg_setup();
        let (p, _) = pg_writer(&pool);
        appends_extend_the_stored_text(&pool, &p).await;
    }

    #[actix::test]
    async fn a_failing_write_without_savepoint_fails_its_batch_and_changes_nothing() {
        let (_dir, pool, p, recorder) = setup();
        p.write(seq_write(1)).await.expect("first");
        let failing = Write {
            apply: Box::new(|conn| {
                queries::set_channel_last_seq(conn, "c1", 99)?;
                Err(ApiError::conflict("unexpected"))
            }),
            savepoint: false,
            ..seq_write(2)
        };
        // Its partial change cannot be undone alone: the whole batch is refused.
        let err = p.write(failing).await.expect_err("batch failed");
        assert_eq!(err.code, crate::error::ErrorCode::Backpressure);
        {
            let mut conn = pool.get().expect("conn");
            assert_eq!(queries::channel_last_seq(&mut conn, "c1").expect("seq"), 1);
        }
        p.write(seq_write(2)).await.expect("2 still follows 1");
        assert_eq!(*recorder.0.lock().expect("lock"), vec![1, 2]);
    }

    #[actix::test]
    async fn a_stale_write_that_can_be_rebuilt_commits_on_the_next_free_seq() {
        let (_dir, pool, p, _) = setup();
        p.write(seq_write(1)).await.expect("first");
        p.write(seq_write(2)).await.expect("another node's write");
        let chain = SeqChain::default();
        let rebuildable = |seq: i64| Write {
            channel_seqs: Some(ChannelSeqs {
                chain: Some(chain.clone()),
                rebase: Some(Box::new(|_, seq| {
                    let apply: Apply = Box::new(|_| Ok(true));
                    let event = EventDraft::new("message.created", serde_json::json!({}))
                        .channel("c1")
                        .seq(seq);
                    Ok((apply, vec![event]))
                })),
                ..ChannelSeqs::new("c1".into(), seq, seq)
            }),
            ..seq_write(seq)
        };
        // Prepared on a view where 1 was the last: rebuilt on 3.
        let events = p.write(rebuildable(2)).await.expect("rebased");
        assert_eq!(events[0].seq, Some(3));
        assert!(chain.is_broken(), "the chain's later writes are stale");
        // A write of the broken chain that cannot be rebuilt is refused.
        let stale = Write {
            channel_seqs: Some(ChannelSeqs {
                chain: Some(chain.clone()),
                ..ChannelSeqs::new("c1".into(), 4, 4)
            }),
            ..seq_write(4)
        };
        assert!(matches!(
            p.enqueue_typed(stale).await,
            Err(WriteError::StaleSeq { committed: 3 })
        ));
        let mut conn = pool.get().expect("conn");
        assert_eq!(queries::channel_last_seq(&mut conn, "c1").expect("seq"), 3);
    }

    // ---- PostgreSQL (SWITCHBOARD_TEST_POSTGRES) ----

    use crate::store::pg_test::TestDb;

    /// A fresh PostgreSQL database with workspace "1" and channel "c1".
    fn pg_setup() -> (TestDb, DbPool) {
        let db = TestDb::create();
        let pool = db.pool(8);
        seed(&pool);
        (db, pool)
    }

    fn pg_writer(pool: &DbPool) -> (Persistence, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let (p, _) = Persistence::start(
            pool,
            recorder.clone(),
            Arc::new(Metrics::new()),
            PersistenceConfig::default(),
        )
        .expect("start");
        (p, recorder)
    }

    #[actix::test]
    async fn postgres_commits_contiguous_seqs_with_dense_cursors_in_order() {
        let (_db, pool) = pg_setup();
        let (p, recorder) = pg_writer(&pool);
        let futures: Vec<_> = (1..=200).map(|s| p.write(seq_write(s))).collect();
        let cursors: Vec<i64> = futures_util::future::join_all(futures)
            .await
            .into_iter()
            .map(|r| r.expect("committed")[0].cursor.expect("cursor"))
            .collect();
        assert_eq!(cursors, (1..=200).collect::<Vec<_>>());
        assert_eq!(
            *recorder.0.lock().expect("lock"),
            (1..=200).collect::<Vec<_>>()
        );
        let mut conn = pool.get().expect("conn");
        assert_eq!(
            queries::channel_last_seq(&mut conn, "c1").expect("seq"),
            200
        );
        assert_eq!(
            queries::workspace_cursor_state(&mut conn, "1")
                .expect("ws")
                .0,
            200
        );
    }

    #[actix::test]
    async fn postgres_refuses_a_stale_seq_as_such_and_its_chain_after_it() {
        let (_db, pool) = pg_setup();
        let (p, recorder) = pg_writer(&pool);
        p.write(seq_write(1)).await.expect("first");
        match p.enqueue_typed(seq_write(1)).await {
            Err(WriteError::StaleSeq { committed }) => assert_eq!(committed, 1),
            other => panic!("expected a stale seq, got {:?}", other.map(|_| ())),
        }
        // A chain: 3 does not follow, so 2 after it — which would follow — is refused too.
        let chain = SeqChain::default();
        let chained = |seq: i64| Write {
            channel_seqs: Some(ChannelSeqs {
                chain: Some(chain.clone()),
                ..ChannelSeqs::new("c1".into(), seq, seq)
            }),
            ..seq_write(seq)
        };
        let (a, b) = (p.enqueue_typed(chained(3)), p.enqueue_typed(chained(2)));
        assert!(matches!(
            a.await,
            Err(WriteError::StaleSeq { committed: 1 })
        ));
        assert!(matches!(b.await, Err(WriteError::StaleSeq { .. })));
        // A write refused by its own change is not a stale seq, and changes nothing.
        let failing = Write {
            apply: Box::new(|_| Err(ApiError::conflict("no"))),
            ..seq_write(2)
        };
        assert!(matches!(
            p.enqueue_typed(failing).await,
            Err(WriteError::Refused(e)) if e.code == crate::error::ErrorCode::Conflict
        ));
        p.write(seq_write(2)).await.expect("2 follows 1");
        let mut conn = pool.get().expect("conn");
        assert_eq!(queries::channel_last_seq(&mut conn, "c1").expect("seq"), 2);
        assert_eq!(
            queries::workspace_cursor_state(&mut conn, "1")
                .expect("ws")
                .0,
            2
        );
        assert_eq!(*recorder.0.lock().expect("lock"), vec![1, 2]);
    }

    /// One "node": `n` writes to c1, each prepared on the seq it believes committed,
    /// pipelined `depth` at a time; a refused pipeline reloads the committed seq from the
    /// store and prepares its writes again (what a ChannelActor does). Returns how many
    /// refusals it met.
    async fn node(
        p: Persistence,
        pool: DbPool,
        n: usize,
        depth: usize,
        tag: &'static str,
    ) -> usize {
        let mut done = 0;
        let mut refused = 0;
        let mut last = 0;
        while done < n {
            let chain = SeqChain::default();
            let batch = depth.min(n - done);
            let futures: Vec<_> = (1..=batch as i64)
                .map(|i| {
                    let seq = last + i;
                    p.enqueue_typed(Write {
                        channel_seqs: Some(ChannelSeqs {
                            chain: Some(chain.clone()),
                            ..ChannelSeqs::new("c1".into(), seq, seq)
                        }),
                        events: vec![EventDraft::new(
                            "message.created",
                            serde_json::json!({ "node": tag }),
                        )
                        .channel("c1")
                        .seq(seq)],
                        ..seq_write(seq)
                    })
                })
                .collect();
            let mut stale = false;
            for r in futures_util::future::join_all(futures).await {
                match r {
                    Ok(events) => {
                        done += 1;
                        last = events[0].seq.expect("seq");
                    }
                    Err(WriteError::StaleSeq { .. }) => stale = true,
                    Err(e) => panic!("{tag}: unexpected failure {e:?}"),
                }
            }
            if stale {
                refused += 1;
                last = queries::channel_last_seq(&mut pool.get().expect("conn"), "c1")
                    .expect("reload");
            }
        }
        refused
    }

    #[actix::test]
    async fn postgres_two_nodes_writing_one_channel_keep_seqs_contiguous_and_cursors_dense() {
        let (_db, pool_a) = pg_setup();
        let pool_b = crate::store::open(pool_a.url(), 8).expect("second node's pool");
        let (a, rec_a) = pg_writer(&pool_a);
        let (b, rec_b) = pg_writer(&pool_b);
        let n = 300;
        let (ra, rb) = futures_util::future::join(
            node(a, pool_a.clone(), n, 8, "a"),
            node(b, pool_b.clone(), n, 8, "b"),
        )
        .await;
        let mut conn = pool_a.get().expect("conn");
        assert_eq!(
            queries::channel_last_seq(&mut conn, "c1").expect("seq"),
            2 * n as i64
        );
        assert_eq!(
            queries::workspace_cursor_state(&mut conn, "1")
                .expect("ws")
                .0,
            2 * n as i64
        );
        // Every write once, seqs 1..=2n, cursors 1..=2n, and the cursor order is the seq
        // order: commit order across both nodes.
        let rows = queries::events_after_for(&mut conn, "1", "alice", 0, i64::MAX, 10_000)
            .expect("events");
        let cursors: Vec<i64> = rows.iter().map(|r| r.cursor).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq.expect("seq")).collect();
        assert_eq!(cursors, (1..=2 * n as i64).collect::<Vec<_>>());
        assert_eq!(seqs, (1..=2 * n as i64).collect::<Vec<_>>());
        let from_a = rows.iter().filter(|r| r.payload.contains("\"a\"")).count();
        assert_eq!(from_a, n, "every write of node a committed once");
        // Each node published its own commits in increasing cursor order.
        for rec in [&rec_a, &rec_b] {
            let published = rec.0.lock().expect("lock").clone();
            assert_eq!(published.len(), n);
            assert!(published.windows(2).all(|w| w[0] < w[1]));
        }
        log::info!("refused pipelines: a {ra}, b {rb}");
    }

    #[actix::test]
    async fn postgres_two_nodes_writing_one_workspace_allocate_dense_cursors() {
        let (_db, pool_a) = pg_setup();
        let pool_b = crate::store::open(pool_a.url(), 8).expect("second node's pool");
        let (a, _) = pg_writer(&pool_a);
        let (b, _) = pg_writer(&pool_b);
        // Writes without seqs (reads, reactions…) from both nodes interleave freely.
        let plain = || {
            Write::new(
                "1".into(),
                None,
                Box::new(|_| Ok(true)),
                vec![EventDraft::new("reaction.added", serde_json::json!({})).channel("c1")],
            )
        };
        let mut futures = Vec::new();
        for _ in 0..200 {
            futures.push(a.enqueue(plain()));
            futures.push(b.enqueue(plain()));
        }
        let mut cursors: Vec<i64> = futures_util::future::join_all(futures)
            .await
            .into_iter()
            .map(|r| r.expect("committed")[0].cursor.expect("cursor"))
            .collect();
        cursors.sort_unstable();
        assert_eq!(cursors, (1..=400).collect::<Vec<_>>());
    }

    #[actix::test]
    async fn postgres_unreachable_fails_writes_with_backpressure_and_recovers() {
        let (db, pool) = pg_setup();
        let (p, _) = pg_writer(&pool);
        p.write(seq_write(1)).await.expect("first");
        // Cut every connection of the database, as a restart of the server does.
        {
            use diesel::connection::SimpleConnection;
            use diesel::Connection;
            let mut admin = diesel::pg::PgConnection::establish(&crate::store::pg_test::base_url())
                .expect("admin");
            admin
                .batch_execute(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = '{}' AND pid <> pg_backend_pid()",
                    db.name
                ))
                .expect("terminate");
        }
        // The writer's connection is dead: the batch fails cleanly, with backpressure.
        let err = p.write(seq_write(2)).await.expect_err("connection lost");
        assert_eq!(err.code, crate::error::ErrorCode::Backpressure);
        assert!(err.retry_after.is_some());
        // …and the next batch runs on a fresh connection from the pool.
        let mut ok = false;
        for _ in 0..50 {
            if p.write(seq_write(2)).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "writes resume by themselves");
        let mut conn = pool.get().expect("conn");
        assert_eq!(queries::channel_last_seq(&mut conn, "c1").expect("seq"), 2);
    }
}
