//! Cluster mode end to end (issue 6): three real `switchboard serve` processes on one
//! PostgreSQL database and one Redis of their own, driven over real sockets only.
//!
//! - cross-node delivery on both faces (chat WebSocket and Pusher V2, chat API and `/events`);
//! - two nodes writing one channel, and one workspace across channels, at once: every post
//!   answered, seqs contiguous, replay and live delivery in strict cursor order, nothing twice;
//! - SIGKILL of a node mid-stream: its clients reconnect elsewhere with their cursor or V2
//!   positions and miss nothing; every acknowledged write is in PostgreSQL;
//! - Redis restarted mid-stream: the other node repairs the gap from PostgreSQL;
//! - PostgreSQL stopped (a private instance): writes answer 503 `backpressure` with
//!   Retry-After, live state keeps working, nothing is half written, and service resumes by
//!   itself with contiguous seqs.
//!
//! Needs `SWITCHBOARD_TEST_POSTGRES` (`make test` / `scripts/test-services.sh` set it) and the
//! PostgreSQL and Redis server programs; missing services fail the tests with the reason.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::cluster::{conflicts_seen, Cluster, Tap, TapEnd};
use switchboard_integration::harness::{
    assert_error, cursor_num, cursor_str, sign_query, uniq, ApiClient, Frame, SignOpts, TestServer,
    WsClient,
};
use switchboard_integration::pg_server::{PgDatabase, PgServer};
use switchboard_integration::pusher_client::{string_data, trigger, PusherClient};
use tokio::time::Instant;

/// The longest wait for anything that should happen (a delivery, a repair, a recovery).
const WAIT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------- helpers

fn id_of(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("id: {v}"))
        .to_owned()
}

fn cursor_of(v: &Value) -> u128 {
    cursor_num(&cursor_str(&v["cursor"])).unwrap_or_else(|| panic!("numeric cursor: {v}"))
}

fn serial_of(v: &Value) -> i64 {
    v["serial"]
        .as_i64()
        .unwrap_or_else(|| panic!("serial: {v}"))
}

/// The `message.created` frames among `frames`.
fn created(frames: &[Value]) -> Vec<Value> {
    frames
        .iter()
        .filter(|f| f["type"] == json!("message.created"))
        .cloned()
        .collect()
}

/// Every frame is a `message.created`, each once, and their cursors follow `after` one by one
/// (workspace cursors are dense; every event after `after` is one of these).
fn assert_contiguous(frames: &[Value], after: u128, what: &str) {
    let mut prev = after;
    let mut ids = HashSet::new();
    for f in frames {
        assert_eq!(
            f["type"],
            json!("message.created"),
            "{what}: other event {f}"
        );
        let c = cursor_of(f);
        assert_eq!(c, prev + 1, "{what}: cursor gap or repeat at {f}");
        assert!(ids.insert(id_of(f)), "{what}: duplicate {f}");
        prev = c;
    }
}

/// Reads `n` `message.created` frames (others skipped) within [`WAIT`].
async fn read_created(ws: &mut WsClient, n: usize, what: &str) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws.next_frame(left).await {
            Frame::Json(v) if v["type"] == json!("message.created") => got.push(v),
            Frame::Json(_) => {}
            other => panic!("{what}: after {} of {n} messages: {other:?}", got.len()),
        }
    }
    got
}

/// Nothing more arrives on a chat socket within a short window.
async fn assert_quiet(ws: &mut WsClient, what: &str) {
    match ws.next_frame(Duration::from_millis(400)).await {
        Frame::Timeout => {}
        other => panic!("{what}: unexpected {other:?}"),
    }
}

/// Nothing but pings arrives on a Pusher socket within a short window.
async fn assert_quiet_pusher(p: &mut PusherClient, what: &str) {
    match p.next(Duration::from_millis(400)).await {
        Frame::Timeout => {}
        other => panic!("{what}: unexpected {other:?}"),
    }
}

/// The Pusher frames of `event` on `channel`.
fn pusher_events(frames: &[Value], event: &str, channel: &str) -> Vec<Value> {
    frames
        .iter()
        .filter(|f| f["event"] == json!(event) && f["channel"] == json!(channel))
        .cloned()
        .collect()
}

/// The id of a channel object.
fn cid_of(channel: &Value) -> String {
    channel["id"]
        .as_str()
        .unwrap_or_else(|| panic!("channel id: {channel}"))
        .to_owned()
}

/// A V2 Pusher socket signed in with `entity`'s chat token, subscribed to `name`.
async fn v2_subscribed(node: &TestServer, entity: &str, name: &str) -> (PusherClient, Value) {
    let mut p = node
        .pusher(&format!("?protocol=2&token={}", node.token_for(entity)))
        .await;
    let ok = p.subscribe(name, None, None).await;
    (p, ok)
}

type Posted = Result<(u16, Value), String>;

/// Posts `(channel id, text)` pairs through `client`, `in_flight` at a time; answers each
/// post with what came back (a transport error as `Err`).
async fn post_all(
    client: ApiClient,
    posts: Vec<(String, String)>,
    in_flight: usize,
) -> Vec<((String, String), Posted)> {
    futures_util::stream::iter(posts.into_iter().map(|(cid, text)| {
        let client = client.clone();
        async move {
            let r = client
                .try_request(
                    Method::POST,
                    &format!("/api/channels/{cid}/messages"),
                    Some(&json!({"data": text})),
                )
                .await;
            ((cid, text), r)
        }
    }))
    .buffer_unordered(in_flight)
    .collect()
    .await
}

/// The `message.created` events of a channel in PostgreSQL, in cursor order:
/// `(event id, cursor, seq)`.
fn stored_events(db_url: &str, cid: &str) -> Vec<(String, u128, i64)> {
    let out = switchboard_integration::pg_server::psql(
        db_url,
        &format!(
            "SELECT id || '|' || cursor || '|' || seq FROM events \
             WHERE channel_id = '{cid}' AND event_type = 'message.created' ORDER BY cursor"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.trim().split('|');
            let id = parts.next().expect("id").to_owned();
            let cursor = parts.next().expect("cursor").parse().expect("cursor");
            let seq = parts.next().expect("seq").parse().expect("seq");
            (id, cursor, seq)
        })
        .collect()
}

/// `history_seq → data` of a channel's messages in PostgreSQL (stored as JSON text).
fn stored_messages(db_url: &str, cid: &str) -> BTreeMap<i64, Value> {
    let out = switchboard_integration::pg_server::psql(
        db_url,
        &format!(
            "SELECT history_seq || '|' || coalesce(data, 'null') FROM messages \
             WHERE channel_id = '{cid}' ORDER BY history_seq"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (seq, data) = l.trim().split_once('|').expect("seq|data");
            let data =
                serde_json::from_str(data).unwrap_or_else(|e| panic!("data is JSON ({e}): {data}"));
            (seq.parse().expect("seq"), data)
        })
        .collect()
}

/// A plain HTTP client that shows headers (the harness's answers drop them).
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// What came back from a request: status, `Retry-After`, body, how long it took.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
    took: Duration,
}

async fn send(req: reqwest::RequestBuilder, what: &str) -> Answer {
    let start = Instant::now();
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    let bytes = resp.bytes().await.expect("body");
    let body = switchboard_integration::harness::parse_body(status, &bytes, what);
    Answer {
        status,
        retry_after,
        body,
        took: start.elapsed(),
    }
}

/// `POST /api/channels/{cid}/messages` as the bearer of `token` on `node`.
async fn chat_post(node: &TestServer, token: &str, cid: &str, text: &str) -> Answer {
    let req = http()
        .post(format!("{}/api/channels/{cid}/messages", node.base_url()))
        .bearer_auth(token)
        .json(&json!({"data": text}));
    send(req, &format!("post {text} on {}", node.addr())).await
}

/// A signed `POST /apps/{id}/events` on `node`.
async fn pusher_trigger(node: &TestServer, channel: &str, name: &str, data: &str) -> Answer {
    let path = format!("/apps/{}/events", node.app.id);
    let body =
        serde_json::to_vec(&json!({"name": name, "channel": channel, "data": data})).expect("body");
    let q = sign_query(
        &node.app,
        "POST",
        &path,
        &body,
        &[],
        chrono::Utc::now().timestamp(),
        true,
        false,
    );
    let req = http()
        .post(format!("{}{path}?{q}", node.base_url()))
        .header("content-type", "application/json")
        .body(body);
    send(req, &format!("trigger {name} on {}", node.addr())).await
}

/// SPEC §8's 503 `backpressure` with a positive integer `Retry-After`.
fn assert_backpressure(a: &Answer, what: &str) {
    assert_error(&(a.status, a.body.clone()), 503, "backpressure");
    let ra = a
        .retry_after
        .as_deref()
        .unwrap_or_else(|| panic!("{what}: 503 without Retry-After: {}", a.body));
    let secs: u64 = ra
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After is whole seconds: {ra:?}"));
    assert!(secs >= 1, "{what}: Retry-After {secs}");
}

/// Polls `check` every 100 ms until it holds; panics after `limit` with `what`.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------------- 1. delivery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_nodes_on_both_faces() {
    let db = PgDatabase::fresh();
    let c = Cluster::start(&db.url(), 3).await;
    let (a, b, cc) = (c.node(0), c.node(1), c.node(2));
    let alice = a.user("alice", "human", "member").await;
    a.create_entity("bob", "Bob", "human", "member").await;
    a.create_entity("carol", "Carol", "human", "member").await;
    let name = uniq("team");
    let cid = cid_of(
        &alice
            .create_group(&name, &["bob", "carol"], json!({}))
            .await,
    );

    let mut alice_a = a.ws(&alice.token, None).await;
    let mut bob_b = b.ws(&b.token_for("bob"), None).await;
    let mut carol_c = cc.ws(&cc.token_for("carol"), None).await;
    let (mut carol_v2, ok) = v2_subscribed(cc, "carol", &name).await;
    assert_eq!(ok["stream_id"], json!(cid), "{ok}");

    // Chat API on A → chat sockets on A, B, C and the Pusher V2 socket on C.
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(alice.say(&cid, &format!("from a {i}")).await);
    }
    let sent_ids: Vec<String> = sent.iter().map(|s| id_of(&s["event"])).collect();
    let mut last = Vec::new();
    for (ws, who) in [
        (&mut alice_a, "alice on A"),
        (&mut bob_b, "bob on B"),
        (&mut carol_c, "carol on C"),
    ] {
        let ready = cursor_num(ws.ready_cursor.as_deref().expect("ready")).expect("cursor");
        let got = read_created(ws, 5, who).await;
        assert_contiguous(&got, ready, who);
        assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), sent_ids, "{who}");
        for (g, s) in got.iter().zip(&sent) {
            assert_eq!(g["payload"]["data"], s["message"]["data"], "{who}: {g}");
            assert_eq!(g["seq"], s["message"]["history_serial"], "{who}: {g}");
            assert_eq!(g["channel_id"], json!(cid), "{who}: {g}");
        }
        last.push(cursor_of(&got[4]));
    }
    for (i, s) in sent.iter().enumerate() {
        let f = carol_v2.expect("message", Some(&name)).await;
        assert_eq!(f["data"], s["message"]["data"], "{f}");
        assert_eq!(serial_of(&f), i as i64 + 1, "{f}");
        assert_eq!(f["message_id"], s["message"]["message_serial"], "{f}");
        assert_eq!(f["stream_id"], json!(cid), "{f}");
    }

    // Pusher HTTP on C → chat sockets on A and B (and C), and the V2 socket on C.
    trigger(cc, &name, "announce", "from c", None).await;
    for (i, (ws, who)) in [
        (&mut alice_a, "alice on A"),
        (&mut bob_b, "bob on B"),
        (&mut carol_c, "carol on C"),
    ]
    .into_iter()
    .enumerate()
    {
        let got = read_created(ws, 1, who).await;
        let ev = &got[0];
        assert_eq!(ev["channel_id"], json!(cid), "{who}: {ev}");
        assert_eq!(ev["payload"]["data"], json!("from c"), "{who}: {ev}");
        assert_eq!(ev["seq"], json!(6), "{who}: {ev}");
        assert_eq!(cursor_of(ev), last[i] + 1, "{who}: {ev}");
        assert_quiet(ws, who).await;
    }
    let f = carol_v2.expect("announce", Some(&name)).await;
    assert_eq!((serial_of(&f), &f["data"]), (6, &json!("from c")), "{f}");
    assert_quiet_pusher(&mut carol_v2, "carol V2 on C").await;
}

// ------------------------------------------------------------------------- 2. concurrency

/// Two nodes post to one channel (and a second channel of the workspace) at the same time,
/// as fast as they answer, 8 posts in flight on each: their writes conflict all the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_two_nodes_keep_seqs_and_cursor_order() {
    two_nodes_write_at_once(8).await;
}

async fn two_nodes_write_at_once(in_flight: usize) {
    const ONE: usize = 200; // per node, to the shared channel
    const OTHER: usize = 50; // per node, to a second channel of the workspace
    let db = PgDatabase::fresh();
    let c = Cluster::start(&db.url(), 3).await;
    let (a, b, cc) = (c.node(0), c.node(1), c.node(2));
    let alice = a.user("alice", "human", "member").await;
    a.create_entity("bob", "Bob", "human", "member").await;
    let bob = b.client("bob", &b.token_for("bob"));
    let ch1 = cid_of(&alice.create_group(&uniq("busy"), &["bob"], json!({})).await);
    let ch2 = cid_of(&alice.create_group(&uniq("side"), &["bob"], json!({})).await);

    let live = c.node(2).ws(&alice.token, None).await;
    let ready = cursor_num(live.ready_cursor.as_deref().expect("ready")).expect("cursor");
    let live = Tap::start(live);

    // Every fourth post of a node goes to the second channel.
    let plan = |tag: &str| -> Vec<(String, String)> {
        let (mut one, mut other) = (0, 0);
        let mut out = Vec::new();
        while one < ONE || other < OTHER {
            if other < OTHER && (out.len() % 5 == 4 || one == ONE) {
                out.push((ch2.clone(), format!("{tag}-2-{other}")));
                other += 1;
            } else {
                out.push((ch1.clone(), format!("{tag}-1-{one}")));
                one += 1;
            }
        }
        out
    };
    let start = Instant::now();
    let (from_a, from_b) = futures_util::future::join(
        post_all(alice.clone(), plan("a"), in_flight),
        post_all(bob, plan("b"), in_flight),
    )
    .await;
    let took = start.elapsed();
    let total = 2 * (ONE + OTHER);
    eprintln!("{total} posts from two nodes ({in_flight} in flight on each) in {took:?}");
    let conflicts = conflicts_seen(a).await + conflicts_seen(b).await;
    eprintln!("{conflicts} writes refused or renumbered for another node's write");
    assert!(
        conflicts > 0,
        "the two nodes never contended for the channel"
    );

    // Every post answered 201; per channel, seqs 1..N each once.
    let mut seqs: HashMap<String, Vec<i64>> = HashMap::new();
    let mut acked: HashMap<String, (String, i64, String)> = HashMap::new(); // id → (cid, seq, text)
    for ((cid, text), r) in from_a.iter().chain(&from_b) {
        let (st, body) = r.as_ref().unwrap_or_else(|e| panic!("post {text}: {e}"));
        assert_eq!(*st, 201, "post {text}: {body}");
        assert_eq!(body["message"]["data"], json!(text), "{body}");
        let seq = body["message"]["history_serial"]
            .as_i64()
            .unwrap_or_else(|| panic!("{body}"));
        seqs.entry(cid.clone()).or_default().push(seq);
        let id = id_of(&body["event"]);
        assert!(
            acked
                .insert(id.clone(), (cid.clone(), seq, text.clone()))
                .is_none(),
            "event {id} answered twice"
        );
    }
    for (cid, n) in [(&ch1, 2 * ONE), (&ch2, 2 * OTHER)] {
        let mut s = seqs.remove(cid).expect("posts of the channel");
        s.sort_unstable();
        assert_eq!(s, (1..=n as i64).collect::<Vec<_>>(), "seqs of {cid}");
        // PostgreSQL has them, seq order = cursor order.
        let stored = stored_events(c.db_url(), cid);
        assert_eq!(
            stored.iter().map(|e| e.2).collect::<Vec<_>>(),
            (1..=n as i64).collect::<Vec<_>>(),
            "seqs of {cid} in cursor order in PostgreSQL"
        );
    }

    // The live socket on the third node: every event once, in cursor order, no gap.
    let frames = live
        .wait_for(WAIT, "live socket on C", |f| created(f).len() >= total)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_ws, frames_all, end) = live.stop().await;
    assert_eq!(end, TapEnd::Stopped, "the live socket stayed open");
    assert_eq!(
        frames_all.len(),
        frames.len(),
        "nothing after the last event"
    );
    assert_contiguous(&frames, ready, "live socket on C");
    let mut next_seq: HashMap<String, i64> = HashMap::new();
    for f in &frames {
        let id = id_of(f);
        let (cid, seq, text) = acked
            .get(&id)
            .unwrap_or_else(|| panic!("live event not answered to a writer: {f}"));
        assert_eq!(f["channel_id"], json!(cid), "{f}");
        assert_eq!(f["seq"], json!(seq), "{f}");
        assert_eq!(f["payload"]["data"], json!(text), "{f}");
        let n = next_seq.entry(cid.clone()).or_insert(0);
        *n += 1;
        assert_eq!(*seq, *n, "channel seqs arrive in order: {f}");
    }
    let live_ids: Vec<String> = frames.iter().map(id_of).collect();

    // A replay from the start on every node: each event once, strictly increasing cursors,
    // the messages in the order the live socket saw them.
    for (i, node) in [a, b, cc].into_iter().enumerate() {
        let mut ws = node.ws(&alice.token, Some("0")).await;
        let mut got = Vec::new();
        let deadline = Instant::now() + WAIT;
        let last = live_ids.last().expect("events").clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match ws.next_frame(left).await {
                Frame::Json(v) => {
                    let done = v["id"] == json!(last);
                    got.push(v);
                    if done {
                        break;
                    }
                }
                other => panic!("replay on node {i}: after {} frames: {other:?}", got.len()),
            }
        }
        assert_quiet(&mut ws, "replay").await;
        let mut prev = 0u128;
        let mut ids = HashSet::new();
        for f in &got {
            let cur = cursor_of(f);
            assert!(cur > prev, "replay on node {i}: cursor order at {f}");
            prev = cur;
            assert!(ids.insert(id_of(f)), "replay on node {i}: duplicate {f}");
        }
        let replayed: Vec<String> = created(&got).iter().map(id_of).collect();
        assert_eq!(replayed, live_ids, "replay on node {i} = live order");
    }
}

// ------------------------------------------------------------------------- 3. SIGKILL

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_resume_elsewhere_and_miss_nothing() {
    let db = PgDatabase::fresh();
    let mut c = Cluster::start(&db.url(), 3).await;
    let (a, b) = (c.node(0), c.node(1));
    let alice = a.user("alice", "human", "member").await;
    a.create_entity("bob", "Bob", "human", "member").await;
    a.create_entity("carol", "Carol", "human", "member").await;
    let carol = b.client("carol", &b.token_for("carol"));
    let name = uniq("stream");
    let cid = cid_of(
        &alice
            .create_group(&name, &["bob", "carol"], json!({}))
            .await,
    );
    let bob_token = a.token_for("bob");

    // Bob on A: the chat socket (live from its ready cursor) and a V2 Pusher socket.
    let ws = a.ws(&bob_token, None).await;
    let ready = cursor_num(ws.ready_cursor.as_deref().expect("ready")).expect("cursor");
    let chat_a = Tap::start(ws);
    let (v2, _) = v2_subscribed(a, "bob", &name).await;
    let v2_a = Tap::start(v2.ws);

    // Writers: two through A (alice), two through B (carol), until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let acked_b = Arc::new(AtomicUsize::new(0));
    let writer = |client: ApiClient, tag: String, count: Option<Arc<AtomicUsize>>| {
        let (stop, cid) = (stop.clone(), cid.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let text = format!("{tag}-{i}");
                i += 1;
                let path = format!("/api/channels/{cid}/messages");
                match client
                    .try_request(Method::POST, &path, Some(&json!({"data": text})))
                    .await
                {
                    Ok((201, body)) => {
                        acked.push(body);
                        if let Some(n) = &count {
                            n.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                    Ok((st, body)) => panic!("post {text}: {st} {body}"),
                    // The node is gone: this write is not acknowledged.
                    Err(_) => break,
                }
            }
            acked
        })
    };
    let writers = vec![
        writer(alice.clone(), "a0".into(), None),
        writer(alice.clone(), "a1".into(), None),
        writer(carol.clone(), "b0".into(), Some(acked_b.clone())),
        writer(carol.clone(), "b1".into(), Some(acked_b.clone())),
    ];

    chat_a
        .wait_for(WAIT, "bob's chat socket on A before the kill", |f| {
            created(f).len() >= 40
        })
        .await;
    c.node_mut(0).kill_hard();
    let (b, a_addr) = (c.node(1), c.node(0).addr());
    let (chat_frames_a, end) = chat_a.closed(Duration::from_secs(5)).await;
    assert!(matches!(end, TapEnd::Closed(_)), "{end:?}");
    let (v2_frames_a, end) = v2_a.closed(Duration::from_secs(5)).await;
    assert!(matches!(end, TapEnd::Closed(_)), "{end:?}");
    let seen_a = created(&chat_frames_a);
    assert_eq!(seen_a.len(), chat_frames_a.len(), "only messages on A");
    let last_cursor = seen_a.last().map(cursor_of).unwrap_or(ready);
    let serials_a: Vec<i64> = pusher_events(&v2_frames_a, "message", &name)
        .iter()
        .map(serial_of)
        .collect();
    let last_serial = serials_a.last().copied().unwrap_or(0);

    // They reconnect to B: the chat socket with its last cursor, V2 with its position.
    let chat_b = Tap::start(b.ws(&bob_token, Some(&last_cursor.to_string())).await);
    let (mut v2, _) = v2_subscribed(b, "bob", &name).await;
    v2.send(
        "sockudo:resume",
        json!({"channel_positions": {name.clone(): {"serial": last_serial, "stream_id": cid}}}),
    )
    .await;
    let v2_b = Tap::start(v2.ws);

    // B's writers go on for a while after the kill, then everyone stops.
    let after_kill = acked_b.load(Ordering::Acquire);
    within(WAIT, "40 more writes through B", || {
        let n = acked_b.load(Ordering::Acquire);
        async move { n >= after_kill + 40 }
    })
    .await;
    stop.store(true, Ordering::Release);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }

    // Every acknowledged write is in PostgreSQL; the stored seqs are 1..N in cursor order.
    let stored = stored_events(c.db_url(), &cid);
    let stored_ids: Vec<String> = stored.iter().map(|e| e.0.clone()).collect();
    let in_db: HashSet<&String> = stored_ids.iter().collect();
    for body in &acked {
        let id = id_of(&body["event"]);
        assert!(in_db.contains(&id), "acknowledged write missing: {body}");
    }
    let n = stored.len() as i64;
    assert_eq!(
        stored.iter().map(|e| e.2).collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>(),
        "seqs in cursor order"
    );
    eprintln!(
        "killed {a_addr} after {} events; {} acknowledged, {n} stored",
        seen_a.len(),
        acked.len()
    );

    // The chat socket: what A delivered, then what B replayed and streamed: every stored
    // event exactly once, in cursor order.
    let last_id = stored_ids.last().expect("events").clone();
    chat_b
        .wait_for(WAIT, "bob's chat socket on B", |f| {
            f.iter().any(|e| e["id"] == json!(last_id))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_ws, chat_frames_b, end) = chat_b.stop().await;
    assert_eq!(end, TapEnd::Stopped);
    let mut all = seen_a.clone();
    all.extend(created(&chat_frames_b));
    assert_eq!(
        all.len(),
        chat_frames_a.len() + chat_frames_b.len(),
        "only messages"
    );
    assert_eq!(
        all.iter().map(id_of).collect::<Vec<_>>(),
        stored_ids,
        "chat socket: every event once, in cursor order"
    );
    assert_contiguous(&all, ready, "chat socket across the kill");

    // The V2 socket: serials 1..N once each, with the stored data.
    let texts = stored_messages(c.db_url(), &cid);
    let v2_frames_b = v2_b
        .wait_for(WAIT, "bob's V2 socket on B", |f| {
            f.iter()
                .any(|e| e["event"] == json!("sockudo:resume_success"))
                && pusher_events(f, "message", &name)
                    .iter()
                    .any(|e| serial_of(e) == n)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_ws, v2_frames_b2, end) = v2_b.stop().await;
    assert_eq!(end, TapEnd::Stopped);
    assert_eq!(v2_frames_b2.len(), v2_frames_b.len(), "nothing more");
    let failed: Vec<&Value> = v2_frames_b
        .iter()
        .filter(|f| f["event"] == json!("sockudo:resume_failed"))
        .collect();
    assert!(failed.is_empty(), "resume failed: {failed:?}");
    let done = v2_frames_b
        .iter()
        .find(|f| f["event"] == json!("sockudo:resume_success"))
        .expect("resume_success");
    assert_eq!(string_data(done)["failed"], json!([]), "{done}");
    let mut serials = serials_a.clone();
    assert!(
        serials_a.windows(2).all(|w| w[0] < w[1]),
        "in order on A: {serials_a:?}"
    );
    for f in pusher_events(&v2_frames_b, "message", &name) {
        let s = serial_of(&f);
        assert_eq!(Some(&f["data"]), texts.get(&s), "serial {s}: {f}");
        serials.push(s);
    }
    let mut sorted = serials.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (1..=n).collect::<Vec<_>>(),
        "V2: every serial exactly once (as received: {serials:?})"
    );
}

// ------------------------------------------------------------------------- 4. Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_is_repaired_from_postgres() {
    const N: usize = 120;
    let db = PgDatabase::fresh();
    let mut c = Cluster::start(&db.url(), 3).await;
    let (a, b, cc) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    let alice = a.user("alice", "human", "member").await;
    a.create_entity("bob", "Bob", "human", "member").await;
    let name = uniq("feed");
    let cid = cid_of(&alice.create_group(&name, &["bob"], json!({})).await);

    let ws = b.ws(&b.token_for("bob"), None).await;
    let ready_b = cursor_num(ws.ready_cursor.as_deref().expect("ready")).expect("cursor");
    let chat_b = Tap::start(ws);
    let ws = cc.ws(&alice.token, None).await;
    let ready_c = cursor_num(ws.ready_cursor.as_deref().expect("ready")).expect("cursor");
    let chat_c = Tap::start(ws);
    let (v2, _) = v2_subscribed(b, "bob", &name).await;
    let v2_b = Tap::start(v2.ws);

    let mut sent = Vec::new();
    for i in 0..N {
        if i == N / 3 {
            c.redis.stop();
        }
        if i == 2 * N / 3 {
            c.redis.restart().await;
        }
        let r = chat_post(a, &alice.token, &cid, &format!("m{i}")).await;
        assert_eq!(r.status, 201, "post m{i}: {}", r.body);
        sent.push(r.body);
        if (N / 3..2 * N / 3).contains(&i) {
            // Spread the outage's writes over a second.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let sent_ids: Vec<String> = sent.iter().map(|s| id_of(&s["event"])).collect();

    for (tap, ready, who) in [
        (chat_b, ready_b, "bob on B"),
        (chat_c, ready_c, "alice on C"),
    ] {
        let frames = tap.wait_for(WAIT, who, |f| created(f).len() >= N).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_ws, all, end) = tap.stop().await;
        assert_eq!(end, TapEnd::Stopped, "{who}: the socket stayed open");
        assert_eq!(all.len(), frames.len(), "{who}: nothing more");
        assert_contiguous(&frames, ready, who);
        assert_eq!(
            frames.iter().map(id_of).collect::<Vec<_>>(),
            sent_ids,
            "{who}: every message once, in order"
        );
    }
    let frames = v2_b
        .wait_for(WAIT, "bob's V2 socket on B", |f| {
            pusher_events(f, "message", &name).len() >= N
        })
        .await;
    let serials: Vec<i64> = pusher_events(&frames, "message", &name)
        .iter()
        .map(serial_of)
        .collect();
    assert_eq!(serials, (1..=N as i64).collect::<Vec<_>>(), "V2 serials");
    let (_ws, _, end) = v2_b.stop().await;
    assert_eq!(end, TapEnd::Stopped);

    // Live through Redis again.
    let mut ws = b.ws(&b.token_for("bob"), None).await;
    let ready = cursor_num(ws.ready_cursor.as_deref().expect("ready")).expect("cursor");
    let mut more = Vec::new();
    for i in 0..5 {
        more.push(id_of(
            &alice.say(&cid, &format!("after {i}")).await["event"],
        ));
    }
    let got = read_created(&mut ws, 5, "bob on B after the restart").await;
    assert_contiguous(&got, ready, "after the restart");
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), more);
}

// ------------------------------------------------------------------------- 5. PostgreSQL

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_answers_backpressure_and_service_resumes_by_itself() {
    let mut pg = PgServer::start().await;
    let c = Cluster::start(&pg.url(), 3).await;
    let (a, b, cc) = (c.node(0), c.node(1), c.node(2));
    let alice = a.user("alice", "human", "member").await;
    a.create_entity("bob", "Bob", "human", "member").await;
    let bob_token = b.token_for("bob");
    let name = uniq("ops");
    let cid = cid_of(&alice.create_group(&name, &["bob"], json!({})).await);
    let feed = uniq("feed");
    for i in 0..3 {
        let r = chat_post(c.node(i), &alice.token, &cid, &format!("before {i}")).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }

    let mut bob_ws = b.ws(&bob_token, None).await;
    let ready = cursor_num(bob_ws.ready_cursor.as_deref().expect("ready")).expect("cursor");
    let mut sub = cc.pusher("?protocol=2").await;
    sub.subscribe(&feed, None, None).await;

    pg.stop();
    let outage = Instant::now();

    // Every node notices: /readyz answers 503 backpressure, /healthz stays 200.
    for node in [a, b, cc] {
        let took = within(Duration::from_secs(15), "readyz 503", || async {
            let (st, body) = node.get_text("/readyz").await;
            st == 503
                && serde_json::from_str::<Value>(&body)
                    .is_ok_and(|v| v["code"] == json!("backpressure"))
        })
        .await;
        eprintln!("{} not ready after {took:?}", node.addr());
        let (st, body) = node.get_text("/healthz").await;
        assert_eq!(st, 200, "healthz during the outage: {body}");
    }

    // Writes on every node, on both faces: 503 backpressure with Retry-After, promptly.
    for round in 0..2 {
        for (i, node) in [a, b, cc].into_iter().enumerate() {
            let token = if i == 1 { &bob_token } else { &alice.token };
            let r = chat_post(node, token, &cid, &format!("lost {round} {i}")).await;
            assert_backpressure(&r, "chat post during the outage");
            assert!(r.took < Duration::from_secs(5), "answered in {:?}", r.took);
            let r = pusher_trigger(node, &feed, "tick", "lost").await;
            assert_backpressure(&r, "trigger during the outage");
            assert!(r.took < Duration::from_secs(5), "answered in {:?}", r.took);
        }
    }

    // Live state keeps working: the Pusher socket answers pings, `/channels` lists it, the
    // chat socket stays open.
    sub.assert_alive().await;
    let (st, body) = cc
        .signed_with(
            &cc.app,
            Method::GET,
            &format!("/apps/{}/channels", cc.app.id),
            None,
            SignOpts::default(),
        )
        .await;
    assert_eq!(st, 200, "GET /channels during the outage: {body}");
    assert!(body["channels"].get(&feed).is_some(), "{body}");
    assert_quiet(&mut bob_ws, "bob's socket during the outage").await;
    let down_for = outage.elapsed();

    pg.restart().await;
    let back = Instant::now();

    // Service resumes by itself: every node becomes ready, then writes succeed.
    for node in [a, b, cc] {
        let took = within(
            Duration::from_secs(20),
            "readyz 200 after the restart",
            || async { node.get_text("/readyz").await.0 == 200 },
        )
        .await;
        eprintln!("{} ready {took:?} after the restart", node.addr());
    }
    let mut after = Vec::new();
    let mut refused = 0;
    let first = Instant::now();
    loop {
        let r = chat_post(a, &alice.token, &cid, "after 0").await;
        if r.status == 201 {
            after.push(r.body);
            break;
        }
        assert_backpressure(&r, "write while recovering");
        refused += 1;
        assert!(
            first.elapsed() < Duration::from_secs(20),
            "no write succeeded within 20 s of every node being ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = first.elapsed();
    eprintln!(
        "outage {down_for:?}; first write {took:?} after every node was ready \
         ({refused} refused first), {:?} after the restart",
        back.elapsed()
    );
    for (i, node) in [b, cc].into_iter().enumerate() {
        let token = if i == 0 { &bob_token } else { &alice.token };
        let r = chat_post(node, token, &cid, &format!("after {}", i + 1)).await;
        assert_eq!(r.status, 201, "post after the restart: {}", r.body);
        after.push(r.body);
    }
    let r = pusher_trigger(cc, &feed, "tick", "back").await;
    assert_eq!(r.status, 200, "trigger after the restart: {}", r.body);

    // Seqs stay contiguous: the refused writes took none.
    let seqs: Vec<i64> = after
        .iter()
        .map(|r| r["message"]["history_serial"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![4, 5, 6], "{after:?}");
    let t = sub.expect("tick", Some(&feed)).await;
    assert_eq!((serial_of(&t), &t["data"]), (1, &json!("back")), "{t}");

    // The chat socket that stayed open through the outage gets them, with no gap.
    let got = read_created(&mut bob_ws, 3, "bob after the outage").await;
    assert_contiguous(&got, ready, "bob after the outage");
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        after.iter().map(|r| id_of(&r["event"])).collect::<Vec<_>>()
    );
    assert_quiet(&mut bob_ws, "bob after the outage").await;

    // Nothing half written.
    let texts = stored_messages(&pg.url(), &cid);
    let expect: BTreeMap<i64, Value> = [
        "before 0", "before 1", "before 2", "after 0", "after 1", "after 2",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| (i as i64 + 1, json!(t)))
    .collect();
    assert_eq!(texts, expect, "messages in PostgreSQL");
    let stored = stored_events(&pg.url(), &cid);
    assert_eq!(
        stored.iter().map(|e| e.2).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    assert_eq!(
        pg.query("SELECT count(*) FROM events WHERE payload LIKE '%\"lost%'"),
        "0",
        "no event of a refused write"
    );
    assert_eq!(
        pg.query(&format!(
            "SELECT count(*) FROM messages m JOIN channels c ON c.id = m.channel_id \
             WHERE c.name = '{feed}'"
        )),
        "1",
        "the feed holds only the trigger after the restart"
    );
}
