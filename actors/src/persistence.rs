//! PersistenceActor: the one writer. It drains whatever is queued into one transaction
//! (group commit), gives events their workspace cursors in commit order, answers every writer
//! after COMMIT, and only then hands the events to the broker for fan-out.
//!
//! It runs on its own OS thread so blocking diesel calls never stall the async workers; its
//! mailbox is a bounded channel, and a full mailbox is answered with `backpressure`.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diesel::connection::Connection;
use tokio::sync::oneshot;

use crate::broker::Broker;
use crate::domain::event::{Event, EventDraft, LiveRoute};
use crate::domain::message::Message;
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::store::rows::{EventRow, VersionRow};
use crate::store::{queries, Conn, DbPool};

/// The database change of one write: runs inside its own savepoint. Returning `Ok(false)`
/// commits the change but drops the write's events (an idempotent no-op, say).
pub type Apply = Box<dyn FnOnce(&mut Conn) -> ApiResult<bool> + Send>;

/// One write: its change, the channel seqs it takes, and the events it emits.
pub struct Write {
    pub workspace_id: String,
    /// `(channel_id, first_seq, last_seq)` when the write takes channel seqs; they must follow
    /// the committed `last_seq` of the channel exactly, so seqs stay contiguous.
    pub channel_seqs: Option<(String, i64, i64)>,
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
/// once per message per batch, the last one winning — a batch commits atomically, so nobody
/// sees the states in between (a stream's appends in one batch rewrite its text once).
pub struct VersionWrite {
    pub row: VersionRow,
    pub state: Message,
}

impl Write {
    /// A write in its own savepoint, without a message version.
    pub fn new(
        workspace_id: String,
        channel_seqs: Option<(String, i64, i64)>,
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

enum Command {
    Write(Write, oneshot::Sender<WriteResult>),
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
        // Checkpoints copy the WAL into the database file and fsync it; done on the writer
        // they stall every batch behind them. A thread of its own copies frames (PASSIVE)
        // twice a second; the writer's own, rarer checkpoint then finds little left to copy
        // and only resets the WAL, which bounds its size.
        {
            use diesel::connection::SimpleConnection;
            // A batch of hundreds of writes must not spill dirty pages mid-transaction: the
            // writer alone gets a 32 MiB page cache (readers keep the 2 MiB default).
            conn.batch_execute("PRAGMA wal_autocheckpoint = 4000; PRAGMA cache_size = -32768;")
                .map_err(|e| format!("persistence connection: {e}"))?;
        }
        let checkpointer = start_checkpointer(pool)?;
        let (tx, rx) = sync_channel(config.queue_capacity);
        let handle = std::thread::Builder::new()
            .name("persistence".into())
            .spawn(move || {
                Writer {
                    conn,
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
    /// future of its commit.
    pub fn enqueue(
        &self,
        write: Write,
    ) -> impl std::future::Future<Output = WriteResult> + 'static {
        let (reply, rx) = oneshot::channel();
        let queued = match self.tx.try_send(Command::Write(write, reply)) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(ApiError::backpressure("the write queue is full")),
            Err(TrySendError::Disconnected(_)) => {
                Err(ApiError::backpressure("the store is shutting down"))
            }
        };
        async move {
            queued?
                .await
                .unwrap_or_else(|_| Err(ApiError::backpressure("the store is shutting down")))
        }
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

/// How often the WAL is checkpointed (PASSIVE: never blocks the writer).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Runs PASSIVE checkpoints until the returned sender is dropped.
fn start_checkpointer(pool: &DbPool) -> Result<std::sync::mpsc::Sender<()>, String> {
    use diesel::connection::SimpleConnection;
    let mut conn = pool
        .get()
        .map_err(|e| format!("checkpoint connection: {e}"))?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("checkpoint".into())
        .spawn(move || loop {
            let last = matches!(
                stopped.recv_timeout(CHECKPOINT_EVERY),
                Err(RecvTimeoutError::Disconnected)
            );
            if let Err(e) = conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE);") {
                log::warn!("WAL checkpoint failed: {e}");
            }
            if last {
                return;
            }
        })
        .map_err(|e| format!("checkpoint thread: {e}"))?;
    Ok(stop)
}

struct Writer {
    conn: crate::store::PooledConn,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    max_batch: usize,
}

/// An event as stored, with its payload still as a value (not parsed back from the row).
type StagedEvent = (EventRow, serde_json::Value);

/// One write of a batch after its savepoint: its drafts with cursors, or its error.
type Staged = (
    oneshot::Sender<WriteResult>,
    ApiResult<Vec<StagedEvent>>,
    Vec<(Option<Vec<String>>, LiveRoute)>,
);

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
                    Command::Write(w, reply) => writes.push((w, reply)),
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
                }
            }
            for f in flushes {
                let _ = f.send(());
            }
        }
    }

    fn commit_batch(&mut self, writes: Vec<(Write, oneshot::Sender<WriteResult>)>) {
        let started = Instant::now();
        let n = writes.len();
        let mut staged: Vec<Staged> = Vec::with_capacity(n);
        let outcome = self.conn.immediate_transaction::<_, ApiError, _>(|conn| {
            let mut cursors: HashMap<String, i64> = HashMap::new();
            let mut seqs: HashMap<String, i64> = HashMap::new();
            let mut deferred = Deferred::default();
            for (write, reply) in writes {
                let recipients: Vec<(Option<Vec<String>>, LiveRoute)> = write
                    .events
                    .iter()
                    .map(|e| (e.recipients.clone(), e.live.clone()))
                    .collect();
                if write.version.is_none() {
                    // Its change may read or write message rows: they must be current.
                    deferred.flush(conn, &staged)?;
                }
                let index = staged.len();
                let result = match check_seqs(conn, &write, &seqs) {
                    Err(e) => Err(e),
                    Ok(()) if write.savepoint => conn.transaction::<_, ApiError, _>(|conn| {
                        stage_write(conn, write, &mut cursors, &mut seqs, &mut deferred, None)
                    }),
                    Ok(()) => {
                        let at = Some(index);
                        match stage_write(conn, write, &mut cursors, &mut seqs, &mut deferred, at) {
                            // No savepoint can undo its partial change: the batch goes.
                            Err(e) => {
                                log::error!("a write without savepoint failed: {e}");
                                staged.push((reply, Err(e.clone()), recipients));
                                return Err(e);
                            }
                            ok => ok,
                        }
                    }
                };
                if let Err(e) = &result {
                    if e.code == crate::error::ErrorCode::InternalError {
                        log::warn!("write rolled back: {e}");
                    }
                }
                staged.push((reply, result, recipients));
            }
            deferred.flush(conn, &staged)?;
            for (ws, last) in &cursors {
                queries::set_workspace_last_cursor(conn, ws, *last)?;
            }
            for (channel, last) in &seqs {
                queries::set_channel_last_seq(conn, channel, *last)?;
            }
            Ok(())
        });
        self.metrics.observe_batch(n, started.elapsed());
        if let Err(e) = outcome {
            log::error!("group commit of {n} writes failed: {e}");
            for (reply, _, _) in staged {
                let _ = reply.send(Err(ApiError::backpressure(
                    "the store could not commit the write",
                )));
            }
            return;
        }
        let mut committed: Vec<Arc<Event>> = Vec::new();
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
                        ev.recipients = r.map(Arc::from);
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
}

/// What the batch's writes left to write: the version and event rows of writes without
/// savepoint, inserted together, and messages' latest states by (channel, serial), the last
/// one winning.
#[derive(Default)]
struct Deferred {
    versions: Vec<VersionRow>,
    /// Indices of staged writes whose event rows are still to insert.
    events: Vec<usize>,
    states: HashMap<(String, String), Message>,
}

impl Deferred {
    fn defer_state(&mut self, m: Message) {
        self.states
            .insert((m.channel_id.clone(), m.message_serial.clone()), m);
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
        for (_, m) in self.states.drain() {
            queries::save_message_state(conn, &m)?;
        }
        Ok(())
    }
}

/// Refuses a write whose seqs do not follow its channel's committed ones, before any change.
fn check_seqs(conn: &mut Conn, write: &Write, seqs: &HashMap<String, i64>) -> ApiResult<()> {
    let Some((channel, first, last)) = &write.channel_seqs else {
        return Ok(());
    };
    let committed = match seqs.get(channel) {
        Some(s) => *s,
        None => queries::channel_last_seq(conn, channel)?,
    };
    if *first != committed + 1 || last < first {
        log::warn!("seq gap on {channel}: committed {committed}, got {first}..{last}");
        return Err(ApiError::backpressure(
            "the channel's write order was interrupted; retry",
        ));
    }
    Ok(())
}

/// Applies one write whose seqs were checked: runs its change, writes its version, defers
/// its message state and stages its events with the next cursors of its workspace. With
/// `deferred_at` (its index among the staged writes) its rows wait in `deferred` instead.
fn stage_write(
    conn: &mut Conn,
    write: Write,
    cursors: &mut HashMap<String, i64>,
    seqs: &mut HashMap<String, i64>,
    deferred: &mut Deferred,
    deferred_at: Option<usize>,
) -> ApiResult<Vec<StagedEvent>> {
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
    let mut rows = Vec::new();
    if keep_events && !write.events.is_empty() {
        let mut next = match cursors.get(&write.workspace_id) {
            Some(c) => *c,
            None => queries::workspace_cursor_state(conn, &write.workspace_id)?.0,
        };
        let now = crate::ids::now_rfc3339();
        for draft in write.events {
            next += 1;
            let row = EventRow {
                workspace_id: write.workspace_id.clone(),
                cursor: next,
                id: crate::ids::new_event_id(),
                event_type: draft.event_type.to_string(),
                channel_id: draft.channel_id,
                seq: draft.seq,
                payload: serde_json::to_string(&draft.payload).map_err(ApiError::internal)?,
                is_private: draft.recipients.is_some(),
                created_at: now.clone(),
                recipients: draft
                    .recipients
                    .as_deref()
                    .map(crate::store::rows::recipients_text),
            };
            if deferred_at.is_none() {
                queries::insert_event(conn, &row)?;
            }
            rows.push((row, draft.payload));
        }
        cursors.insert(write.workspace_id.clone(), next);
    }
    if let Some((channel, _, last)) = write.channel_seqs {
        seqs.insert(channel, last);
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

    fn setup() -> (tempfile::TempDir, DbPool, Persistence, Arc<Recorder>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url =
            crate::store::DatabaseUrl::parse(&format!("sqlite://{}/t.db", dir.path().display()))
                .expect("url");
        let pool = crate::store::open(&url, 4).expect("open");
        let mut conn = pool.get().expect("conn");
        queries::insert_workspace(&mut conn, &crate::store::rows::WorkspaceRow::for_tests("1"))
            .expect("workspace");
        let creator =
            crate::domain::entity::test_entity("alice", crate::domain::entity::Role::Member);
        let channel =
            crate::domain::channel::new_direct("c1".into(), "1".into(), &creator, "bob", "t")
                .expect("c");
        queries::insert_channel(&mut conn, &channel).expect("channel");
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
            channel_seqs: Some(("c1".into(), seq, seq)),
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
    fn state_write(seq: i64, message: &Message) -> Write {
        let row = VersionRow {
            channel_id: "c1".into(),
            seq,
            message_serial: message.message_serial.clone(),
            action: "append".into(),
            actor: None,
            op_id: None,
            body: "{}".into(),
            created_at: "t".into(),
            fingerprint: None,
        };
        Write {
            version: Some(Box::new(VersionWrite {
                row,
                state: message.clone(),
            })),
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
}
