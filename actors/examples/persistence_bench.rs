//! Durable appends through the persistence actor alone (no HTTP, no actors in front): the
//! writer's ceiling. Each write is what an AI-stream append commits (as `channel/versions.rs`
//! builds it): a version row, one `message.appended` event with its recipients, and what the
//! append changed of its message (fragment, version serial, append count), with a contiguous
//! channel seq, group-committed with WAL and `synchronous=FULL`. The writer folds a batch's
//! appends to one message into one save, so with `streams` messages appended to in turn, a
//! batch of n appends extends min(n, streams) message rows; every 4096 appends a message's
//! text starts again, as a long reply continues in a new message.
//!
//! `cargo run --release -p switchboard-actors --example persistence_bench -- [writes] [in_flight] [streams] [db path or URL] [per-stream]`
//! (defaults: 200,000 writes, 16,384 in flight, 1 stream, a temporary SQLite database (`-`),
//! all streams in one channel; `per-stream` gives each stream a channel of its own, as the
//! ai-stream scenario does). A `postgres://…` URL (an empty database; its tables are
//! created) measures PostgreSQL.

/// The server's allocator (see `src/main.rs`): the writer's speed depends on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use switchboard_actors::broker::Broker;
use switchboard_actors::domain::channel::new_implicit;
use switchboard_actors::domain::event::{Event, EventDraft};
use switchboard_actors::domain::message::{Message, NewMessage, StreamStatus};
use switchboard_actors::metrics::Metrics;
use switchboard_actors::persistence::{
    ChannelSeqs, Persistence, PersistenceConfig, VersionWrite, Write,
};
use switchboard_actors::store::message_state::StateWrite;
use switchboard_actors::store::rows::{VersionRow, WorkspaceRow};
use switchboard_actors::store::{self, queries, DatabaseUrl};

/// Counts what would be fanned out; the bench measures the writer, not delivery.
struct CountingBroker(std::sync::atomic::AtomicUsize);

impl Broker for CountingBroker {
    fn publish(&self, events: Vec<Arc<Event>>) {
        self.0
            .fetch_add(events.len(), std::sync::atomic::Ordering::Relaxed);
    }
    fn publish_ephemeral(&self, _: Arc<Event>) {}
}

fn arg<T: std::str::FromStr>(i: usize, default: T) -> T {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), String> {
    let writes: i64 = arg(1, 200_000);
    let in_flight: usize = arg(2, 16_384);
    let streams: usize = arg(3, 1).max(1);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let default_path = dir.path().join("bench.db").display().to_string();
    let path: String = Some(arg(4, "-".to_string()))
        .filter(|p| p != "-")
        .unwrap_or(default_path);
    // `per-stream`: each stream in a channel of its own (as ai-stream's private channels);
    // a batch then marks as many channels as it has streams.
    let channel_per_stream = arg(5, String::new()) == "per-stream";
    let url = if path.starts_with("postgres://") || path.starts_with("postgresql://") {
        DatabaseUrl::parse(&path)?
    } else {
        DatabaseUrl::parse(&format!("sqlite://{path}"))?
    };
    let pool = store::open(&url, 4)?;
    let now = switchboard_actors::ids::now_rfc3339();
    let channel_count = if channel_per_stream { streams } else { 1 };
    let channels = (0..channel_count)
        .map(|c| {
            new_implicit(
                format!("chn_bench{c}"),
                "1".into(),
                &format!("bench{c}"),
                &now,
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    // Stream n's channel, and the last seq each channel handed out.
    let channel_of = |n: usize| n % channel_count;
    let mut last_seqs = vec![0i64; channel_count];
    let mut messages: Vec<Message> = (0..streams)
        .map(|n| {
            let c = channel_of(n);
            last_seqs[c] += 1;
            NewMessage {
                data: Some(json!("")),
                ..Default::default()
            }
            .into_message(&channels[c].id, "agent", last_seqs[c], &now)
        })
        .collect();
    {
        let mut conn = pool.get().map_err(|e| e.to_string())?;
        queries::insert_workspace(
            &mut conn,
            &WorkspaceRow {
                id: "1".into(),
                app_key: "bench".into(),
                secret: "bench".into(),
                name: "bench".into(),
                settings: "{}".into(),
                last_cursor: 0,
                pruned_through: 0,
                created_at: now.clone(),
            },
        )
        .map_err(|e| e.to_string())?;
        for (channel, last) in channels.iter().zip(&last_seqs) {
            queries::insert_channel(&mut conn, channel).map_err(|e| e.to_string())?;
            queries::set_channel_last_seq(&mut conn, &channel.id, *last)
                .map_err(|e| e.to_string())?;
        }
        for m in &messages {
            queries::insert_message(&mut conn, m, "1").map_err(|e| e.to_string())?;
        }
    }
    let broker = Arc::new(CountingBroker(Default::default()));
    let metrics = Arc::new(Metrics::new());
    let (persistence, _writer) = Persistence::start(
        &pool,
        broker.clone(),
        metrics.clone(),
        PersistenceConfig::default(),
    )?;
    // One shared list, as a channel actor keeps it while its members stay the same.
    let recipients: Arc<[String]> = (0..6).map(|i| format!("member{i}")).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut failed = 0usize;
    runtime.block_on(async {
        let mut pending = std::collections::VecDeque::new();
        for n in 0..writes as usize {
            let stream = n % streams;
            let c = channel_of(stream);
            last_seqs[c] += 1;
            let seq = last_seqs[c];
            let channel = &channels[c];
            let message = &mut messages[stream];
            let fragment = "tok ";
            message.version_serial = switchboard_actors::ids::version_serial(seq);
            let stored = if message.append_count == 4096 {
                // A reply rotates at 4096 appends: here an update that empties the text
                // stands in for the next message.
                message.data = json!("");
                message.append_count = 0;
                message.stream_status = StreamStatus::None;
                StateWrite::Full(Box::new(message.clone()))
            } else {
                message.append_count += 1;
                message.stream_status = StreamStatus::Open;
                if let serde_json::Value::String(text) = &mut message.data {
                    text.push_str(fragment);
                }
                // What the channel actor sends for an append: the fragment and counters (with
                // the whole text only at a long text's checkpoints).
                StateWrite::of_append(message, fragment, None)
            };
            let row = VersionRow {
                channel_id: channel.id.clone(),
                seq,
                message_serial: message.message_serial.clone(),
                action: "append".into(),
                actor: Some("agent".into()),
                op_id: None,
                body: json!({"data": fragment, "length": 4}).to_string(),
                created_at: now.clone(),
                fingerprint: None,
            };
            let draft = EventDraft::new(
                "message.appended",
                json!({"message_id": message.message_serial, "author_id": "agent",
                       "fragment": fragment, "length": 4, "version_serial": message.version_serial}),
            )
            .channel(&channel.id)
            .seq(seq)
            .private_to_shared(Some(recipients.clone()));
            let fut = persistence.enqueue(Write {
                workspace_id: "1".into(),
                channel_seqs: Some(ChannelSeqs::new(channel.id.clone(), seq, seq)),
                apply: Box::new(|_| Ok(true)),
                events: vec![draft],
                version: Some(Box::new(VersionWrite { row, state: stored })),
                savepoint: false,
            });
            pending.push_back(fut);
            if pending.len() >= in_flight {
                if let Some(f) = pending.pop_front() {
                    failed += usize::from(f.await.is_err());
                }
            }
        }
        for f in pending {
            failed += usize::from(f.await.is_err());
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let published = broker.0.load(std::sync::atomic::Ordering::Relaxed);
    let batches = metrics.commit_batches.get();
    println!(
        "persistence: {writes} durable appends to {streams} stream(s) in {channel_count} channel(s) in {secs:.2} s = {:.0} appends/s ({failed} failed, {published} events published, {batches} group commits)",
        writes as f64 / secs,
    );
    // The last line is the result for `make bench` to collect.
    println!(
        "{}",
        json!({"scenario": "persistence", "writes": writes, "in_flight": in_flight,
               "streams": streams, "channels": channel_count,
               "secs": secs, "appends_per_sec": writes as f64 / secs, "failed": failed,
               "events_published": published, "group_commits": batches,
               "passed": failed == 0 && published == writes as usize})
    );
    Ok(())
}
