//! AI token streaming on versioned messages under load (docs/versioned-messages.md, SPEC §2,
//! §3 realtime): many concurrent appenders agree on one order everywhere, a SIGKILL keeps
//! every acknowledged fragment, a subscriber that reconnects mid-stream (or after it) rebuilds
//! the same text from compacted replay, and version serials stay contiguous.
//!
//! Every loop is bounded and every wait has a deadline; all traffic is loopback.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{
    cursor_str, i64_of, str_of, uniq, urlencode, ApiClient, Frame, TestServer, WsClient,
};

const PREFIX: &str = "<start>";
const FRAG_LEN: usize = 10;

/// A fragment unique to (task, i), always FRAG_LEN bytes.
fn frag(task: usize, i: usize) -> String {
    let f = format!("[{task:03}.{i:04}]");
    assert_eq!(f.len(), FRAG_LEN);
    f
}

/// Splits `PREFIX + fragments` into its fragments.
fn split_fragments(text: &str, prefix: &str) -> Vec<String> {
    let rest = text
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("text starts with {prefix:?}: {text:.200}"));
    assert_eq!(
        rest.len() % FRAG_LEN,
        0,
        "text is prefix + whole fragments: {rest:.400}"
    );
    rest.as_bytes()
        .chunks(FRAG_LEN)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect()
}

fn version_serial_of(seq: i64) -> String {
    format!("v{seq:012}")
}

/// Appends through the chat API; expects 200 applied and returns the answer.
async fn append(c: &ApiClient, cid: &str, serial: &str, body: &Value) -> Value {
    let (st, resp) = c
        .post(
            &format!("/api/channels/{cid}/messages/{serial}/append"),
            body,
        )
        .await;
    assert_eq!(st, 200, "{} appends {body} to {serial}: {resp}", c.id);
    assert_eq!(resp["status"], json!("applied"), "{resp}");
    assert_eq!(resp["event"]["type"], json!("message.appended"), "{resp}");
    resp
}

/// The latest visible state through the chat API.
async fn get_message(c: &ApiClient, cid: &str, serial: &str) -> Value {
    let (st, resp) = c
        .get(&format!("/api/channels/{cid}/messages/{serial}"))
        .await;
    assert_eq!(st, 200, "GET message {serial}: {resp}");
    resp["message"].clone()
}

/// Every version of a message through the chat API, following `next_cursor`.
async fn versions(
    c: &ApiClient,
    cid: &str,
    serial: &str,
    direction: &str,
    limit: usize,
) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut path = format!(
            "/api/channels/{cid}/messages/{serial}/versions?direction={direction}&limit={limit}"
        );
        if let Some(cur) = &cursor {
            path.push_str(&format!("&cursor={}", urlencode(cur)));
        }
        let (st, resp) = c.get(&path).await;
        assert_eq!(st, 200, "versions page {path}: {resp}");
        let page = resp["versions"]
            .as_array()
            .unwrap_or_else(|| panic!("versions is an array: {resp}"))
            .clone();
        assert!(
            page.len() <= limit,
            "page longer than limit {limit}: {resp}"
        );
        out.extend(page);
        match resp["has_more"].as_bool() {
            Some(true) => {
                let next = cursor_str(&resp["next_cursor"]);
                assert_eq!(
                    Some(next.as_str()),
                    out.last().and_then(|v| v["version_serial"].as_str()),
                    "next_cursor is the last item's version_serial: {resp}"
                );
                cursor = Some(next);
            }
            Some(false) => return out,
            None => panic!("has_more is a boolean: {resp}"),
        }
    }
    panic!("versions of {serial} never ended");
}

/// Checks a full `oldest_first` listing: delivery serials strictly increasing, version serials
/// derived from them, history/message serials constant, create first.
fn check_listing(list: &[Value], serial: &str) {
    assert!(!list.is_empty(), "a message has at least one version");
    assert_eq!(
        list[0]["action"],
        json!("create"),
        "first version: {}",
        list[0]
    );
    let hs = &list[0]["history_serial"];
    for w in list.windows(2) {
        let (a, b) = (
            i64_of(&w[0]["delivery_serial"], "delivery_serial"),
            i64_of(&w[1]["delivery_serial"], "delivery_serial"),
        );
        assert!(a < b, "delivery serials increase: {} then {}", w[0], w[1]);
    }
    for v in list {
        let ds = i64_of(&v["delivery_serial"], "delivery_serial");
        assert_eq!(v["version_serial"], json!(version_serial_of(ds)), "{v}");
        assert_eq!(v["message_serial"], json!(serial), "{v}");
        assert_eq!(&v["history_serial"], hs, "{v}");
    }
}

/// Collects `message.appended` frames of one message until `want` have arrived.
async fn collect_appends(
    mut ws: WsClient,
    mid: String,
    want: usize,
    timeout: Duration,
) -> Vec<Value> {
    let mut n = 0usize;
    let frames = ws
        .collect_until(timeout, |f| {
            if f["type"] == json!("message.appended") && f["payload"]["message_id"] == json!(mid) {
                n += 1;
            }
            n >= want
        })
        .await;
    frames
        .into_iter()
        .filter(|f| {
            f["type"] == json!("message.appended") && f["payload"]["message_id"] == json!(mid)
        })
        .collect()
}

/// A `message.appended` event that closed its stream.
fn is_closing_append(f: &Value) -> bool {
    f["type"] == json!("message.appended")
        && f["payload"]
            .get("stream_status")
            .is_some_and(|s| !s.is_null())
}

/// A client-side copy of one message rebuilt from events, as the contract tells clients to.
#[derive(Default, Debug)]
struct Replica {
    text: Option<String>,
    /// Seq ranges the events applied cover.
    covered: Vec<(i64, i64)>,
    frames: usize,
    compacted: usize,
    closed: bool,
}

impl Replica {
    fn apply(&mut self, f: &Value, mid: &str) {
        if f["payload"]["message_id"] != json!(mid) {
            return;
        }
        let ty = f["type"].as_str().unwrap_or_default();
        let seq = i64_of(&f["seq"], "event seq");
        let p = &f["payload"];
        match ty {
            "message.created" | "message.updated" | "message.deleted" => {
                self.text = Some(p["data"].as_str().unwrap_or_default().to_owned());
                self.covered.push((seq, seq));
            }
            "message.appended" => {
                if p["compacted"] == json!(true) {
                    let from = i64_of(&p["from_seq"], "from_seq");
                    let to = i64_of(&p["to_seq"], "to_seq");
                    assert!(from < to, "a compacted run covers two or more events: {f}");
                    assert_eq!(seq, to, "a compacted event sits at its run's last seq: {f}");
                    assert!(
                        p.get("fragment").is_none(),
                        "compacted carries data, not fragment: {f}"
                    );
                    assert_eq!(
                        p["version_serial"],
                        json!(version_serial_of(to)),
                        "compacted version_serial is the run's last: {f}"
                    );
                    self.text = Some(str_of(&p["data"], "compacted data"));
                    self.covered.push((from, to));
                    self.compacted += 1;
                } else {
                    assert!(p.get("compacted").is_none_or(|c| c == &json!(false)), "{f}");
                    let text = self
                        .text
                        .as_mut()
                        .unwrap_or_else(|| panic!("an append before the message was known: {f}"));
                    text.push_str(&str_of(&p["fragment"], "fragment"));
                    self.covered.push((seq, seq));
                    assert_eq!(p["version_serial"], json!(version_serial_of(seq)), "{f}");
                }
                let text = self.text.as_deref().unwrap_or_default();
                assert_eq!(
                    p["length"].as_u64(),
                    Some(text.len() as u64),
                    "length is the UTF-8 length of the whole text after the event: {f}"
                );
                if p.get("stream_status").is_some_and(|s| !s.is_null()) {
                    self.closed = true;
                }
            }
            _ => return,
        }
        self.frames += 1;
    }

    /// Asserts the covered ranges tile 1..=last with no gap and no overlap.
    fn assert_tiles(&self, last: i64, who: &str) {
        let mut r = self.covered.clone();
        r.sort_unstable();
        let mut next = 1;
        for (from, to) in &r {
            assert_eq!(
                *from, next,
                "{who}: seqs covered {r:?} have a gap or overlap at {next}"
            );
            next = to + 1;
        }
        assert_eq!(next, last + 1, "{who}: seqs covered {r:?} end at {last}");
    }
}

// ------------------------------------------------------------------------- tests

const TASKS: usize = 50;
const PER_TASK: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_appenders_agree_on_one_order() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let bob_token = {
        let (st, r) = s
            .signed(
                Method::POST,
                &format!("/apps/{}/tokens", s.app.id),
                Some(&json!({"entity_id": "bob",
                             "capabilities": {"message_append_any": ["*"]}})),
            )
            .await;
        assert_eq!(st, 201, "{r}");
        str_of(&r["token"], "token")
    };
    let bob = s.client("bob", &bob_token);
    let ch = alice
        .create_group(&uniq("stream"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");

    let ws_a = s.ws(&alice.token, None).await;
    let ws_b = s.ws(&bob.token, None).await;
    let created = alice.say(&cid, PREFIX).await;
    let mid = str_of(&created["message"]["message_serial"], "message_serial");
    let total = TASKS * PER_TASK;
    let sub_a = tokio::spawn(collect_appends(
        ws_a,
        mid.clone(),
        total,
        Duration::from_secs(180),
    ));
    let sub_b = tokio::spawn(collect_appends(
        ws_b,
        mid.clone(),
        total,
        Duration::from_secs(180),
    ));

    // Every fifth appender goes through the signed server API (privileged, client_id
    // alice); the others through the chat API as alice or as bob (append_any).
    let s = Arc::new(s);
    let channel_name = str_of(&ch["name"], "name");
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let c = if t % 2 == 0 {
            alice.clone()
        } else {
            bob.clone()
        };
        let (cid, mid, s, channel_name) =
            (cid.clone(), mid.clone(), s.clone(), channel_name.clone());
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                let f = frag(t, i);
                if t % 5 == 4 {
                    let path = format!(
                        "/apps/{}/channels/{channel_name}/messages/{mid}/append",
                        s.app.id
                    );
                    let (st, r) = s
                        .signed(
                            Method::POST,
                            &path,
                            Some(&json!({"data": f, "client_id": "alice"})),
                        )
                        .await;
                    assert_eq!(st, 200, "server-API append {f}: {r}");
                    assert_eq!(r["status"], json!("applied"), "{r}");
                    acks.push((f, i64_of(&r["delivery_serial"], "delivery_serial")));
                } else {
                    let r = append(&c, &cid, &mid, &json!({"data": f})).await;
                    assert_eq!(r["event"]["payload"]["fragment"], json!(f), "{r}");
                    acks.push((f, i64_of(&r["event"]["seq"], "event seq")));
                }
            }
            acks
        }));
    }
    let mut acks: Vec<(String, i64)> = Vec::with_capacity(total);
    for t in tasks {
        acks.extend(t.await.expect("appender task"));
    }
    let ack_seqs: BTreeSet<i64> = acks.iter().map(|(_, s)| *s).collect();
    assert_eq!(ack_seqs.len(), total, "every append got its own seq");
    assert_eq!(
        ack_seqs,
        (2..=(total as i64 + 1)).collect::<BTreeSet<_>>(),
        "append seqs follow the create contiguously"
    );

    // The final text: every fragment exactly once.
    let m = get_message(&alice, &cid, &mid).await;
    let text = str_of(&m["data"], "final data");
    let order = split_fragments(&text, PREFIX);
    assert_eq!(
        order.len(),
        total,
        "{} fragments in the final text",
        order.len()
    );
    let sent: BTreeSet<&String> = acks.iter().map(|(f, _)| f).collect();
    let got: BTreeSet<&String> = order.iter().collect();
    assert_eq!(got.len(), total, "no fragment twice in the final text");
    assert_eq!(got, sent, "the final text holds exactly the sent fragments");
    // Within one appender, its (sequential) fragments keep their order.
    for t in 0..TASKS {
        let mine: Vec<&String> = order
            .iter()
            .filter(|f| f.starts_with(&frag(t, 0)[..5]))
            .collect();
        let want: Vec<String> = (0..PER_TASK).map(|i| frag(t, i)).collect();
        assert_eq!(
            mine.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            want,
            "task {t}"
        );
    }

    // Both subscribers saw the same order, the text's order.
    for (who, sub) in [("A", sub_a), ("B", sub_b)] {
        let frames = sub.await.expect("subscriber task");
        assert_eq!(frames.len(), total, "subscriber {who}");
        let frags: Vec<String> = frames
            .iter()
            .map(|f| str_of(&f["payload"]["fragment"], "fragment"))
            .collect();
        assert_eq!(frags, order, "subscriber {who} order = final text order");
        assert_eq!(
            format!("{PREFIX}{}", frags.concat()),
            text,
            "subscriber {who}"
        );
        let mut prev_len = PREFIX.len() as u64;
        for (k, f) in frames.iter().enumerate() {
            let len = f["payload"]["length"]
                .as_u64()
                .unwrap_or_else(|| panic!("length: {f}"));
            assert!(
                len > prev_len,
                "subscriber {who}: length strictly increases at {k}: {f}"
            );
            assert_eq!(len, (PREFIX.len() + (k + 1) * FRAG_LEN) as u64, "{who} {f}");
            prev_len = len;
            assert_eq!(
                f["seq"],
                json!(k as i64 + 2),
                "subscriber {who}: seq in order: {f}"
            );
            assert_eq!(
                f["payload"]["version_serial"],
                json!(version_serial_of(k as i64 + 2)),
                "{f}"
            );
        }
    }

    // The versions listing, oldest first, has the same order and the acknowledged seqs.
    let list = versions(&alice, &cid, &mid, "oldest_first", 100).await;
    check_listing(&list, &mid);
    assert_eq!(list.len(), total + 1, "create + every append");
    let ds: Vec<i64> = list
        .iter()
        .map(|v| i64_of(&v["delivery_serial"], "delivery_serial"))
        .collect();
    assert_eq!(
        ds,
        (1..=(total as i64 + 1)).collect::<Vec<_>>(),
        "contiguous, no duplicate"
    );
    assert_eq!(list[0]["data"], json!(PREFIX));
    let listed: Vec<String> = list[1..]
        .iter()
        .map(|v| {
            assert_eq!(v["action"], json!("append"), "{v}");
            str_of(&v["data"], "append item data")
        })
        .collect();
    assert_eq!(
        listed, order,
        "oldest_first versions order = final text order"
    );
    for (f, seq) in &acks {
        let v = &list[usize::try_from(*seq - 1).expect("seq >= 1")];
        assert_eq!(
            v["data"],
            json!(f),
            "the acknowledged seq {seq} holds {f}: {v}"
        );
    }
    let newest = versions(&alice, &cid, &mid, "newest_first", 37).await;
    let mut rev: Vec<Value> = newest.clone();
    rev.reverse();
    assert_eq!(
        rev.iter()
            .map(|v| v["version_serial"].clone())
            .collect::<Vec<_>>(),
        list.iter()
            .map(|v| v["version_serial"].clone())
            .collect::<Vec<_>>(),
        "newest_first paged by 37 is oldest_first reversed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_stream_keeps_every_acknowledged_fragment() {
    let mut s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    const STREAMS: usize = 3;
    let mut targets: Vec<(String, String)> = Vec::new();
    for k in 0..STREAMS {
        let ch = alice
            .create_group(&uniq(&format!("kill{k}")), &["bob"], json!({}))
            .await;
        let cid = str_of(&ch["id"], "id");
        let m = alice.say(&cid, PREFIX).await;
        targets.push((cid, str_of(&m["message"]["message_serial"], "serial")));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (k, (cid, mid)) in targets.iter().cloned().enumerate() {
        let (c, stop, acked_total) = (alice.clone(), stop.clone(), acked_total.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked: Vec<(String, i64)> = Vec::new();
            for i in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let f = frag(k, i);
                let answer = c
                    .try_request(
                        Method::POST,
                        &format!("/api/channels/{cid}/messages/{mid}/append"),
                        Some(&json!({"data": f})),
                    )
                    .await;
                match answer {
                    Ok((200, body)) => {
                        assert_eq!(body["event"]["payload"]["fragment"], json!(f), "{body}");
                        acked.push((f, i64_of(&body["event"]["seq"], "seq")));
                        acked_total.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break,
                    Ok((st, body)) => panic!("append {f} answered {st} {body} before the kill"),
                }
            }
            acked
        }));
    }
    // Kill once the streams are well under way (bounded wait, not a sleep).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked_total.load(Ordering::Relaxed) < 90 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "appends too slow: {} acknowledged in 60 s",
            acked_total.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.kill_hard();
    stop.store(true, Ordering::Relaxed);
    let mut acked: Vec<Vec<(String, i64)>> = Vec::new();
    for t in tasks {
        acked.push(t.await.expect("appender task"));
    }
    eprintln!(
        "acknowledged before SIGKILL: {:?}",
        acked.iter().map(Vec::len).collect::<Vec<_>>()
    );
    s.restart().await;

    let mut ws = s.ws(&alice.token, None).await;
    for (k, (cid, mid)) in targets.iter().enumerate() {
        let mine = &acked[k];
        assert!(!mine.is_empty(), "stream {k} got acknowledgements");
        let text = str_of(&get_message(&alice, cid, mid).await["data"], "data");
        let acked_text = format!(
            "{PREFIX}{}",
            mine.iter().map(|(f, _)| f.as_str()).collect::<String>()
        );
        assert!(
            text.starts_with(&acked_text),
            "stream {k}: every acknowledged fragment survives, in order\n text: {text:.300}…\n acked: {acked_text:.300}…"
        );
        let rest = &text[acked_text.len()..];
        assert!(
            rest.is_empty() || rest == frag(k, mine.len()),
            "stream {k}: only the one in-flight fragment may follow the acknowledged ones: {rest:?}"
        );
        let list = versions(&alice, cid, mid, "oldest_first", 100).await;
        check_listing(&list, mid);
        let ds: Vec<i64> = list
            .iter()
            .map(|v| i64_of(&v["delivery_serial"], "delivery_serial"))
            .collect();
        assert_eq!(
            ds,
            (1..=list.len() as i64).collect::<Vec<_>>(),
            "stream {k}: no seq gap"
        );
        for (f, seq) in mine {
            let v = &list[usize::try_from(*seq - 1).expect("seq >= 1")];
            assert_eq!(
                v["data"],
                json!(f),
                "stream {k}: acknowledged seq {seq}: {v}"
            );
        }

        // Appends continue after the restart with the next seqs and the right length.
        let mut expect_text = text.clone();
        let mut last = *ds.last().expect("non-empty");
        for j in 0..5 {
            let f = frag(900 + k, j);
            let r = append(&alice, cid, mid, &json!({"data": f})).await;
            last += 1;
            expect_text.push_str(&f);
            assert_eq!(
                r["event"]["seq"],
                json!(last),
                "stream {k}: seq continues: {r}"
            );
            assert_eq!(r["message"]["data"], json!(expect_text), "stream {k}");
            let ev = ws
                .collect_until(Duration::from_secs(10), |e| {
                    e["type"] == json!("message.appended") && e["payload"]["fragment"] == json!(f)
                })
                .await;
            let ev = ev.last().expect("one frame at least");
            assert_eq!(ev["seq"], json!(last), "{ev}");
            assert_eq!(
                ev["payload"]["length"],
                json!(expect_text.len()),
                "length after restart counts the recovered text: {ev}"
            );
        }
        let list = versions(&alice, cid, mid, "oldest_first", 100).await;
        let ds: Vec<i64> = list
            .iter()
            .map(|v| i64_of(&v["delivery_serial"], "delivery_serial"))
            .collect();
        assert_eq!(
            ds,
            (1..=last).collect::<Vec<_>>(),
            "stream {k}: contiguous after restart"
        );
        assert_eq!(
            str_of(&get_message(&alice, cid, mid).await["data"], "data"),
            expect_text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriber_reconnecting_mid_stream_rebuilds_the_same_text() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice
        .create_group(&uniq("reconnect"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");

    let ws_a = s.ws(&alice.token, None).await;
    let mut ws_b = s.ws(&bob.token, None).await;
    let created = alice.say(&cid, PREFIX).await;
    let mid = str_of(&created["message"]["message_serial"], "serial");

    // A: connected for the whole stream, reads until the closing append.
    let a_task = {
        let mid = mid.clone();
        let mut ws_a = ws_a;
        tokio::spawn(async move {
            let mid2 = mid.clone();
            let frames = ws_a
                .collect_until(Duration::from_secs(180), move |f| {
                    f["payload"]["message_id"] == json!(mid2) && is_closing_append(f)
                })
                .await;
            let mut rep = Replica::default();
            for f in &frames {
                rep.apply(f, &mid);
            }
            rep
        })
    };

    // The appender: 100 appends, waits for B to leave, 150 more (an update at 150), waits
    // for B to be back, 50 more, then a closing append.
    let (left_tx, left_rx) = tokio::sync::oneshot::channel::<()>();
    let (back_tx, back_rx) = tokio::sync::oneshot::channel::<()>();
    let progress = Arc::new(AtomicUsize::new(0));
    let appender = {
        let (c, cid, mid, progress) = (alice.clone(), cid.clone(), mid.clone(), progress.clone());
        tokio::spawn(async move {
            let mut left_rx = Some(left_rx);
            let mut back_rx = Some(back_rx);
            for i in 0..300 {
                if i == 100 {
                    let rx = left_rx.take().expect("once");
                    tokio::time::timeout(Duration::from_secs(60), rx)
                        .await
                        .expect("B disconnects in time")
                        .expect("B signals");
                }
                if i == 250 {
                    let rx = back_rx.take().expect("once");
                    tokio::time::timeout(Duration::from_secs(60), rx)
                        .await
                        .expect("B reconnects in time")
                        .expect("B signals");
                }
                if i == 150 {
                    let (st, r) = c
                        .post(
                            &format!("/api/channels/{cid}/messages/{mid}/update"),
                            &json!({"data": "<rewritten>"}),
                        )
                        .await;
                    assert_eq!(st, 200, "update mid-stream: {r}");
                }
                append(&c, &cid, &mid, &json!({"data": frag(0, i)})).await;
                progress.store(i + 1, Ordering::Relaxed);
            }
            let r = append(
                &c,
                &cid,
                &mid,
                &json!({"data": "", "extras": {"status": "complete"}}),
            )
            .await;
            assert!(
                r["event"]["payload"]["stream_status"].is_string(),
                "the closing append's event carries stream_status: {r}"
            );
            i64_of(&r["event"]["seq"], "seq")
        })
    };

    // B: follows until it has 60 appends, leaves, comes back once 200 appends are done.
    let mut b = Replica::default();
    let mut b_cursor = ws_b.ready_cursor.clone().expect("ready cursor");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while b.frames < 61 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws_b.next_frame(left).await {
            Frame::Json(f) => {
                b.apply(&f, &mid);
                b_cursor = cursor_str(&f["cursor"]);
            }
            other => panic!("B before leaving: {other:?} after {} frames", b.frames),
        }
    }
    ws_b.close().await;
    let b_before = b.frames;
    left_tx.send(()).expect("appender waits");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::Relaxed) < 200 {
        assert!(tokio::time::Instant::now() < deadline, "appender stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut ws_b = s.ws(&bob.token, Some(&b_cursor)).await;
    back_tx.send(()).expect("appender waits");
    let frames = ws_b
        .collect_until(Duration::from_secs(120), |f| {
            f["payload"]["message_id"] == json!(mid) && is_closing_append(f)
        })
        .await;
    let missed_from = b.covered.iter().map(|(_, to)| *to).max().expect("some") + 1;
    for f in &frames {
        b.apply(f, &mid);
    }
    let last = appender.await.expect("appender task");
    let a = a_task.await.expect("subscriber A");

    let final_text = str_of(&get_message(&alice, &cid, &mid).await["data"], "data");
    let want: String = std::iter::once("<rewritten>".to_owned())
        .chain((150..300).map(|i| frag(0, i)))
        .collect();
    assert_eq!(
        final_text, want,
        "update replaced the text, later appends followed it"
    );
    assert_eq!(a.text.as_deref(), Some(final_text.as_str()), "A's text");
    assert_eq!(b.text.as_deref(), Some(final_text.as_str()), "B's text");
    assert!(a.closed && b.closed, "both saw the closing append");
    assert_eq!(a.compacted, 0, "live delivery is never compacted");
    a.assert_tiles(last, "A");
    assert_eq!(a.frames as i64, last, "A saw every version once");
    b.assert_tiles(last, "B");
    assert!(
        b.compacted >= 2,
        "B's replay holds at least the run before and the run after the update compacted: {}",
        b.compacted
    );
    let b_after = b.frames - b_before;
    assert!(
        (b_after as i64) < last - missed_from + 1,
        "B needed fewer frames ({b_after}) than the versions it missed ({})",
        last - missed_from + 1
    );
    // The stream is closed: a further append is refused.
    let (st, r) = alice
        .post(
            &format!("/api/channels/{cid}/messages/{mid}/append"),
            &json!({"data": "late"}),
        )
        .await;
    assert_eq!(
        (st, r["code"].as_str()),
        (400, Some("invalid_input")),
        "{r}"
    );
}

/// The replay is read in pages of 500 events, each written once the socket took the one
/// before; a page with appends is read on to the tail so each run is compacted whole. Here
/// the first page (the created message, 498 posts elsewhere, the first append) holds one
/// append, which goes as it is; the 600 after it become one compacted event.
#[tokio::test]
async fn a_run_starting_at_a_page_end_is_compacted_from_the_next_page() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let stream = alice
        .create_group(&uniq("stream"), &["bob"], json!({}))
        .await;
    let chat = alice.create_group(&uniq("chat"), &["bob"], json!({})).await;
    let (cid, chat_id) = (str_of(&stream["id"], "id"), str_of(&chat["id"], "id"));
    let c0 = cursor_now(&s, &bob.token).await;
    let created = alice.say(&cid, PREFIX).await;
    let mid = str_of(&created["message"]["message_serial"], "serial");
    for i in 0..498 {
        alice.say(&chat_id, &format!("elsewhere {i}")).await;
    }
    const N: usize = 601;
    let mut last = Value::Null;
    for i in 0..N {
        last = append(&alice, &cid, &mid, &json!({"data": frag(3, i)})).await["event"].clone();
    }
    let last_seq = i64_of(&last["seq"], "seq");
    let final_text = str_of(&get_message(&alice, &cid, &mid).await["data"], "data");

    let mut ws = s.ws(&bob.token, Some(&c0)).await;
    let frames = ws
        .collect_until(Duration::from_secs(30), |f| f["cursor"] == last["cursor"])
        .await;
    let trailing = ws.drain(Duration::from_millis(300)).await;
    assert!(trailing.is_empty(), "nothing after the run: {trailing:?}");
    assert_eq!(
        frames.len(),
        1 + 498 + 2,
        "created, 498 posts, 1 append, 1 compacted"
    );
    let mine: Vec<&Value> = frames
        .iter()
        .filter(|f| f["channel_id"] == json!(cid) && f["payload"]["message_id"] == json!(mid))
        .collect();
    assert_eq!(mine.len(), 3, "{mine:?}");
    assert_eq!(
        mine[1]["payload"]["fragment"],
        json!(frag(3, 0)),
        "{}",
        mine[1]
    );
    let c = &mine[2]["payload"];
    assert_eq!(c["compacted"], json!(true), "{c}");
    assert_eq!(
        (c["from_seq"].as_i64(), c["to_seq"].as_i64()),
        (Some(3), Some(last_seq))
    );
    let mut rep = Replica::default();
    for f in &mine {
        rep.apply(f, &mid);
    }
    assert_eq!(rep.text.as_deref(), Some(final_text.as_str()));
    rep.assert_tiles(last_seq, "replay over pages");
}

#[tokio::test]
async fn replay_after_a_finished_stream_is_compacted() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice
        .create_group(&uniq("finished"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");
    let before = s.ws(&bob.token, None).await;
    let c0 = before.ready_cursor.clone().expect("ready cursor");
    before.close().await;

    let created = alice.say(&cid, PREFIX).await;
    let mid = str_of(&created["message"]["message_serial"], "serial");
    const N: usize = 300;
    let mut events = Vec::with_capacity(N);
    for i in 0..N {
        let r = append(&alice, &cid, &mid, &json!({"data": frag(1, i)})).await;
        events.push(r["event"].clone());
    }
    let last = &events[N - 1];
    let last_seq = i64_of(&last["seq"], "seq");
    assert_eq!(last_seq, N as i64 + 1);
    let final_text = str_of(&get_message(&alice, &cid, &mid).await["data"], "data");

    let mut ws = s.ws(&bob.token, Some(&c0)).await;
    let frames = ws
        .collect_until(Duration::from_secs(30), |f| f["seq"] == json!(last_seq))
        .await;
    let trailing = ws.drain(Duration::from_millis(300)).await;
    assert!(
        trailing.is_empty(),
        "nothing after the stream's last event: {trailing:?}"
    );
    let mine: Vec<&Value> = frames
        .iter()
        .filter(|f| f["payload"]["message_id"] == json!(mid))
        .collect();
    assert!(
        mine.len() < N,
        "{} frames replayed for {N} appends",
        mine.len()
    );
    assert_eq!(mine.len(), 2, "created + one compacted append: {mine:?}");
    assert_eq!(mine[0]["type"], json!("message.created"), "{}", mine[0]);
    let c = mine[1];
    assert_eq!(c["type"], json!("message.appended"), "{c}");
    let p = &c["payload"];
    assert_eq!(p["compacted"], json!(true), "{c}");
    assert_eq!(p["from_seq"], json!(2), "{c}");
    assert_eq!(p["to_seq"], json!(last_seq), "{c}");
    assert_eq!(p["data"], json!(final_text), "{c}");
    assert_eq!(p["length"], json!(final_text.len()), "{c}");
    assert_eq!(p["message_id"], json!(mid), "{c}");
    assert_eq!(p["author_id"], json!("alice"), "{c}");
    assert_eq!(
        p["version_serial"], last["payload"]["version_serial"],
        "{c}"
    );
    assert_eq!(
        c["cursor"], last["cursor"],
        "the compacted event sits at the run's last cursor"
    );
    let mut rep = Replica::default();
    for f in &frames {
        rep.apply(f, &mid);
    }
    assert_eq!(rep.text.as_deref(), Some(final_text.as_str()));
    rep.assert_tiles(last_seq, "replay");

    // Resuming from the compacted event's cursor replays nothing of the stream again.
    let mut again = s.ws(&bob.token, Some(&cursor_str(&c["cursor"]))).await;
    let dup = again.drain(Duration::from_millis(500)).await;
    assert!(
        dup.is_empty(),
        "no duplicate after the compacted cursor: {dup:?}"
    );

    // A run of one stays a plain append; a run of two is compacted.
    let mut one = s
        .ws(&bob.token, Some(&cursor_str(&events[N - 2]["cursor"])))
        .await;
    let f = one.next_json(Duration::from_secs(10)).await;
    assert_eq!(f["type"], json!("message.appended"), "{f}");
    assert!(
        f["payload"]
            .get("compacted")
            .is_none_or(|c| c == &json!(false)),
        "{f}"
    );
    assert_eq!(f["payload"]["fragment"], json!(frag(1, N - 1)), "{f}");
    assert_eq!(f["payload"]["length"], json!(final_text.len()), "{f}");
    let mut two = s
        .ws(&bob.token, Some(&cursor_str(&events[N - 3]["cursor"])))
        .await;
    let f = two.next_json(Duration::from_secs(10)).await;
    assert_eq!(f["payload"]["compacted"], json!(true), "{f}");
    assert_eq!(f["payload"]["from_seq"], json!(last_seq - 1), "{f}");
    assert_eq!(f["payload"]["to_seq"], json!(last_seq), "{f}");
    assert_eq!(f["payload"]["data"], json!(final_text), "{f}");
    assert!(matches!(
        two.next_frame(Duration::from_millis(300)).await,
        Frame::Timeout
    ));
}

#[tokio::test]
async fn compaction_runs_are_per_message_and_broken_by_other_events_of_it() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group(&uniq("runs"), &["bob"], json!({})).await;
    let cid = str_of(&ch["id"], "id");
    let c0 = {
        let w = s.ws(&bob.token, None).await;
        let c = w.ready_cursor.clone().expect("cursor");
        w.close().await;
        c
    };
    let m1 = str_of(
        &alice.say(&cid, "one:").await["message"]["message_serial"],
        "serial",
    );
    let m2 = str_of(
        &alice.say(&cid, "two:").await["message"]["message_serial"],
        "serial",
    );
    let m3 = str_of(
        &alice.say(&cid, "three:").await["message"]["message_serial"],
        "serial",
    );
    // m1 and m2 interleaved: m1 a0..a4, update, a5..a9; m2 a0..a9 (runs are per message).
    for i in 0..10 {
        if i == 5 {
            let (st, r) = alice
                .post(
                    &format!("/api/channels/{cid}/messages/{m1}/update"),
                    &json!({"data": "one-b:"}),
                )
                .await;
            assert_eq!(st, 200, "{r}");
        }
        append(&alice, &cid, &m1, &json!({"data": frag(1, i)})).await;
        append(&alice, &cid, &m2, &json!({"data": frag(2, i)})).await;
    }
    // m3: single appends separated by an update stay plain.
    append(&alice, &cid, &m3, &json!({"data": frag(3, 0)})).await;
    let (st, r) = alice
        .post(
            &format!("/api/channels/{cid}/messages/{m3}/update"),
            &json!({"name": "renamed"}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let last = append(&alice, &cid, &m3, &json!({"data": frag(3, 1)})).await;
    let last_seq = i64_of(&last["event"]["seq"], "seq");

    let mut ws = s.ws(&bob.token, Some(&c0)).await;
    let frames = ws
        .collect_until(Duration::from_secs(30), |f| f["seq"] == json!(last_seq))
        .await;
    let cursors: Vec<String> = frames.iter().map(|f| cursor_str(&f["cursor"])).collect();
    let uniq_c: BTreeSet<&String> = cursors.iter().collect();
    assert_eq!(uniq_c.len(), cursors.len(), "no cursor twice in the replay");
    let seqs: Vec<i64> = frames.iter().map(|f| i64_of(&f["seq"], "seq")).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "replay in seq order: {seqs:?}"
    );

    let shape = |mid: &str| -> Vec<String> {
        frames
            .iter()
            .filter(|f| f["payload"]["message_id"] == json!(mid))
            .map(|f| {
                let ty = str_of(&f["type"], "type");
                if f["payload"]["compacted"] == json!(true) {
                    format!(
                        "{ty}[{}..{}]",
                        f["payload"]["from_seq"], f["payload"]["to_seq"]
                    )
                } else {
                    ty
                }
            })
            .collect()
    };
    // Seqs: creates 1,2,3; then for i<5: m1 a_i = 4+2i, m2 a_i = 5+2i (4..13); update m1 = 14;
    // i>=5: m1 a_i = 15+2(i-5), m2 a_i = 16+2(i-5) (15..24).
    assert_eq!(
        shape(&m1),
        vec![
            "message.created".to_owned(),
            "message.appended[4..12]".to_owned(),
            "message.updated".to_owned(),
            "message.appended[15..23]".to_owned(),
        ],
        "m1: two runs split by its update"
    );
    assert_eq!(
        shape(&m2),
        vec![
            "message.created".to_owned(),
            "message.appended[5..24]".to_owned()
        ],
        "m2: one run; m1's events between its appends do not break it"
    );
    assert_eq!(
        shape(&m3),
        vec![
            "message.created".to_owned(),
            "message.appended".to_owned(),
            "message.updated".to_owned(),
            "message.appended".to_owned(),
        ],
        "m3: single appends stay plain"
    );
    for (mid, want_last) in [(&m1, 23), (&m2, 24), (&m3, last_seq)] {
        let mut rep = Replica::default();
        for f in &frames {
            rep.apply(f, mid);
        }
        let text = str_of(&get_message(&alice, &cid, mid).await["data"], "data");
        assert_eq!(rep.text.as_deref(), Some(text.as_str()), "{mid}");
        let covered_last = rep.covered.iter().map(|(_, t)| *t).max();
        assert_eq!(covered_last, Some(want_last), "{mid}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mixed_mutations_keep_version_serials_contiguous() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let bob_token = {
        let (st, r) = s
            .signed(
                Method::POST,
                &format!("/apps/{}/tokens", s.app.id),
                Some(&json!({"entity_id": "bob", "capabilities": {
                    "message_append_any": ["*"], "message_update_any": ["*"]}})),
            )
            .await;
        assert_eq!(st, 201, "{r}");
        str_of(&r["token"], "token")
    };
    let bob = s.client("bob", &bob_token);
    let ch = alice
        .create_group(&uniq("mixed"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");
    let mut mids = Vec::new();
    for k in 0..3 {
        let m = alice.say(&cid, &format!("<m{k}>")).await;
        mids.push(str_of(&m["message"]["message_serial"], "serial"));
    }

    const T: usize = 10;
    const OPS: usize = 20;
    let mut tasks = Vec::new();
    for t in 0..T {
        let c = if t % 2 == 0 {
            alice.clone()
        } else {
            bob.clone()
        };
        let (cid, mids) = (cid.clone(), mids.clone());
        tasks.push(tokio::spawn(async move {
            let mut done: Vec<(usize, &'static str, i64)> = Vec::new();
            for j in 0..OPS {
                let k = (t + j) % 3;
                let (action, body) = if j % 7 == 3 {
                    ("update", json!({"data": format!("<u{t:02}.{j:02}>")}))
                } else {
                    ("append", json!({"data": frag(t, j)}))
                };
                let (st, r) = c
                    .post(
                        &format!("/api/channels/{cid}/messages/{}/{action}", mids[k]),
                        &body,
                    )
                    .await;
                assert_eq!(st, 200, "{action} by task {t}: {r}");
                done.push((k, action, i64_of(&r["event"]["seq"], "seq")));
            }
            done
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.extend(t.await.expect("task"));
    }

    let mut all_ds: Vec<i64> = Vec::new();
    for (k, mid) in mids.iter().enumerate() {
        let oldest = versions(&alice, &cid, mid, "oldest_first", 7).await;
        check_listing(&oldest, mid);
        let mut newest = versions(&alice, &cid, mid, "newest_first", 9).await;
        newest.reverse();
        assert_eq!(
            newest
                .iter()
                .map(|v| v["delivery_serial"].clone())
                .collect::<Vec<_>>(),
            oldest
                .iter()
                .map(|v| v["delivery_serial"].clone())
                .collect::<Vec<_>>(),
            "m{k}: both directions list the same versions"
        );
        // Each acknowledged mutation is in its message's listing with its action.
        for (kk, action, seq) in done.iter().filter(|(kk, _, _)| *kk == k) {
            let v = oldest
                .iter()
                .find(|v| v["delivery_serial"] == json!(seq))
                .unwrap_or_else(|| panic!("m{kk}: acknowledged seq {seq} missing"));
            assert_eq!(v["action"], json!(action), "{v}");
        }
        // Replaying the listing gives the visible text.
        let mut text = String::new();
        for v in &oldest {
            match v["action"].as_str() {
                Some("create") | Some("update") => text = str_of(&v["data"], "data"),
                Some("append") => text.push_str(&str_of(&v["data"], "fragment")),
                other => panic!("unexpected action {other:?}: {v}"),
            }
        }
        let m = get_message(&alice, &cid, mid).await;
        assert_eq!(
            m["data"],
            json!(text),
            "m{k}: the listing replays to the latest state"
        );
        assert_eq!(
            m["version_serial"],
            oldest.last().expect("non-empty")["version_serial"],
            "m{k}: latest state is the newest version"
        );
        all_ds.extend(
            oldest
                .iter()
                .map(|v| i64_of(&v["delivery_serial"], "delivery_serial")),
        );
    }
    all_ds.sort_unstable();
    let n = (3 + T * OPS) as i64;
    assert_eq!(
        all_ds,
        (1..=n).collect::<Vec<_>>(),
        "the channel's versions take every seq once, contiguous"
    );
}

/// Bob's cursor at "now" (a live socket's ready cursor), for a later replay.
async fn cursor_now(s: &TestServer, token: &str) -> String {
    let w = s.ws(token, None).await;
    let c = w.ready_cursor.clone().expect("ready cursor");
    w.close().await;
    c
}

#[tokio::test]
async fn compacted_replay_of_a_closed_stream_in_a_direct_channel() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "agent", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let dm = alice.direct("bob").await;
    let cid = str_of(&dm["id"], "id");
    let c0 = cursor_now(&s, &bob.token).await;

    let m = alice.say(&cid, "").await;
    let mid = str_of(&m["message"]["message_serial"], "serial");
    for i in 0..5 {
        append(&alice, &cid, &mid, &json!({"data": frag(7, i)})).await;
    }
    let closing = append(
        &alice,
        &cid,
        &mid,
        &json!({"data": "", "extras": {"status": "complete"}}),
    )
    .await;
    let last_seq = i64_of(&closing["event"]["seq"], "seq");
    let live = &closing["event"]["payload"];
    assert!(live["stream_status"].is_string(), "{closing}");
    assert_eq!(live["direct_conversation_id"], json!(cid), "{closing}");
    assert_eq!(live["extras"], json!({"status": "complete"}), "{closing}");

    let mut ws = s.ws(&bob.token, Some(&c0)).await;
    let frames = ws
        .collect_until(Duration::from_secs(30), |f| f["seq"] == json!(last_seq))
        .await;
    let mine: Vec<&Value> = frames
        .iter()
        .filter(|f| f["payload"]["message_id"] == json!(mid))
        .collect();
    assert_eq!(mine.len(), 2, "created + one compacted run: {mine:?}");
    let c = mine[1];
    let p = &c["payload"];
    assert_eq!(p["compacted"], json!(true), "{c}");
    assert_eq!(
        (p["from_seq"].as_i64(), p["to_seq"].as_i64()),
        (Some(2), Some(last_seq)),
        "{c}"
    );
    let text: String = (0..5).map(|i| frag(7, i)).collect();
    assert_eq!(p["data"], json!(text), "{c}");
    assert_eq!(p["length"], json!(text.len()), "{c}");
    assert_eq!(
        p["direct_conversation_id"],
        json!(cid),
        "direct-channel events carry direct_conversation_id, compacted too: {c}"
    );
    assert_eq!(
        p["stream_status"], live["stream_status"],
        "a replayed run that closed the stream still says so: {c}"
    );
    assert_eq!(
        p["extras"],
        json!({"status": "complete"}),
        "the closing append's extras survive compaction: {c}"
    );
}

#[tokio::test]
async fn compacted_replay_keeps_extras_set_inside_the_run() {
    // The contract promises the same *text*; this checks the same *extras* too: a client that
    // applies `extras` from appended events (as the live payload invites) must not end with
    // other extras after a compacted replay.
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice
        .create_group(&uniq("extras"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");
    let c0 = cursor_now(&s, &bob.token).await;
    let m = alice.say(&cid, PREFIX).await;
    let mid = str_of(&m["message"]["message_serial"], "serial");
    append(
        &alice,
        &cid,
        &mid,
        &json!({"data": frag(8, 0), "extras": {"phase": "thinking"}}),
    )
    .await;
    append(&alice, &cid, &mid, &json!({"data": frag(8, 1)})).await;
    let last = append(&alice, &cid, &mid, &json!({"data": frag(8, 2)})).await;
    let last_seq = i64_of(&last["event"]["seq"], "seq");
    let state = get_message(&alice, &cid, &mid).await;
    assert_eq!(state["extras"], json!({"phase": "thinking"}), "{state}");

    let mut ws = s.ws(&bob.token, Some(&c0)).await;
    let frames = ws
        .collect_until(Duration::from_secs(30), |f| f["seq"] == json!(last_seq))
        .await;
    let mut extras = Value::Null;
    for f in frames
        .iter()
        .filter(|f| f["payload"]["message_id"] == json!(mid))
    {
        if let Some(e) = f["payload"].get("extras") {
            extras = e.clone();
        }
    }
    assert_eq!(
        extras, state["extras"],
        "extras rebuilt from the replay ({frames:?}) differ from the message's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_longer_than_a_backfill_page_is_still_one_compacted_event() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group(&uniq("long"), &["bob"], json!({})).await;
    let cid = str_of(&ch["id"], "id");
    let c0 = cursor_now(&s, &bob.token).await;
    let m = alice.say(&cid, PREFIX).await;
    let mid = str_of(&m["message"]["message_serial"], "serial");
    // 1200 appends (more than two 500-event backfill pages) from 10 concurrent appenders.
    let mut tasks = Vec::new();
    for t in 0..10 {
        let (c, cid, mid) = (alice.clone(), cid.clone(), mid.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..120 {
                append(&c, &cid, &mid, &json!({"data": frag(t, i)})).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("appender task");
    }
    let text = str_of(&get_message(&alice, &cid, &mid).await["data"], "data");
    assert_eq!(text.len(), PREFIX.len() + 1200 * FRAG_LEN);

    let mut ws = s.ws(&bob.token, Some(&c0)).await;
    let frames = ws
        .collect_until(Duration::from_secs(60), |f| f["seq"] == json!(1201))
        .await;
    let trailing = ws.drain(Duration::from_millis(300)).await;
    assert!(trailing.is_empty(), "{trailing:?}");
    let kinds: Vec<String> = frames
        .iter()
        .map(|f| format!("{}@{}", f["type"], f["seq"]))
        .collect();
    assert_eq!(frames.len(), 2, "created + one compacted event: {kinds:?}");
    let p = &frames[1]["payload"];
    assert_eq!(p["compacted"], json!(true), "{kinds:?}");
    assert_eq!(
        (p["from_seq"].as_i64(), p["to_seq"].as_i64()),
        (Some(2), Some(1201))
    );
    assert_eq!(p["data"], json!(text));
    assert_eq!(p["length"], json!(text.len()));
}

/// A stream past a few KiB: its appends stop rewriting the stored text (it is written at
/// checkpoints and at the close, docs/versioned-messages.md), yet the message, the history
/// listing, a SIGKILL and restart, appends after it and the close all see the whole text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_stream_reads_whole_through_checkpoints_a_restart_and_its_close() {
    let mut s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice.create_group(&uniq("long"), &["bob"], json!({})).await;
    let cid = str_of(&ch["id"], "id");
    let mid = str_of(
        &alice.say(&cid, PREFIX).await["message"]["message_serial"],
        "serial",
    );
    // 100-byte fragments: inline up to 2 KiB, then deferred, with a checkpoint at 8 KiB.
    let fragment = |i: usize| format!("{i:05}{}", "x".repeat(95));
    let mut text = PREFIX.to_string();
    let read_back = |text: String| {
        let (alice, cid, mid) = (alice.clone(), cid.clone(), mid.clone());
        async move {
            let m = get_message(&alice, &cid, &mid).await;
            assert_eq!(str_of(&m["data"], "data"), text, "GET message");
            let (st, listed) = alice.get(&format!("/api/channels/{cid}/messages")).await;
            assert_eq!(st, 200, "{listed}");
            let found = listed["messages"]
                .as_array()
                .and_then(|ms| ms.iter().find(|m| m["message_serial"] == json!(mid)))
                .cloned()
                .unwrap_or_else(|| panic!("message listed: {listed}"));
            assert_eq!(str_of(&found["data"], "data"), text, "history listing");
            m
        }
    };
    // The stored state, read back, is what the channel actor answered last: besides the text,
    // the fields a long stream's appends leave to the versions.
    let same_state = |read: &Value, answered: &Value| {
        for key in [
            "version_serial",
            "updated_at",
            "extras",
            "stream_status",
            "deleted",
        ] {
            assert_eq!(read[key], answered[key], "{key}");
        }
    };
    let mut last = Value::Null;
    for i in 0..120 {
        let f = fragment(i);
        text.push_str(&f);
        // One append in the middle (past 2 KiB) also sets extras.
        let body = if i == 50 {
            json!({"data": f, "extras": {"phase": "middle"}})
        } else {
            json!({"data": f})
        };
        last = append(&alice, &cid, &mid, &body).await;
        assert_eq!(last["event"]["payload"]["length"], json!(text.len()));
        if i % 40 == 39 {
            let m = read_back(text.clone()).await;
            same_state(&m, &last["message"]);
        }
    }

    s.kill_hard();
    s.restart().await;
    let m = read_back(text.clone()).await;
    same_state(&m, &last["message"]);
    assert_eq!(m["version_serial"], json!(version_serial_of(121)));
    assert_eq!(m["extras"], json!({"phase": "middle"}));
    assert_eq!(m["stream_status"], json!("open"));

    // The channel actor starts from the stored state: later appends continue the same text.
    for i in 120..150 {
        let f = fragment(i);
        text.push_str(&f);
        last = append(&alice, &cid, &mid, &json!({"data": f})).await;
        assert_eq!(last["event"]["payload"]["length"], json!(text.len()));
    }
    let m = read_back(text.clone()).await;
    same_state(&m, &last["message"]);
    append(
        &alice,
        &cid,
        &mid,
        &json!({"data": "", "extras": {"status": "complete"}}),
    )
    .await;
    let m = read_back(text.clone()).await;
    assert_eq!(m["stream_status"], json!("closed"));
    assert_eq!(m["version_serial"], json!(version_serial_of(152)));

    // And after another restart the closed message is whole from its row.
    s.kill_hard();
    s.restart().await;
    read_back(text).await;
}

/// `Prefer: return=minimal` (RFC 7240) answers a mutation with its event and status only, so
/// a long reply's appends do not each carry the whole text back; without it, the message.
#[tokio::test]
async fn prefer_return_minimal_answers_without_the_message() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let ch = alice
        .create_group(&uniq("minimal"), &["bob"], json!({}))
        .await;
    let cid = str_of(&ch["id"], "id");
    let mid = str_of(
        &alice.say(&cid, PREFIX).await["message"]["message_serial"],
        "serial",
    );
    let path = format!("/api/channels/{cid}/messages/{mid}/append");

    let (st, applied, answer) = alice
        .post_preferring(
            &path,
            &json!({"data": "ab", "op_id": "op-1"}),
            "return=minimal",
        )
        .await;
    assert_eq!(st, 200, "{answer}");
    assert_eq!(applied.as_deref(), Some("return=minimal"));
    let mut keys: Vec<&str> = answer
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    assert_eq!(keys, ["event", "status"], "{answer}");
    assert_eq!(answer["status"], json!("applied"));
    assert_eq!(answer["event"]["type"], json!("message.appended"));
    assert_eq!(answer["event"]["payload"]["fragment"], json!("ab"));
    assert_eq!(
        answer["event"]["payload"]["length"],
        json!(PREFIX.len() + 2)
    );

    // A replayed op_id: no event, still no message.
    let (st, _, dup) = alice
        .post_preferring(
            &path,
            &json!({"data": "ab", "op_id": "op-1"}),
            "return=minimal",
        )
        .await;
    assert_eq!(st, 200, "{dup}");
    assert_eq!(dup, json!({"event": null, "status": "duplicate"}));

    // Other preferences, or none, keep the full answer.
    let (st, applied, full) = alice
        .post_preferring(&path, &json!({"data": "c"}), "return=representation")
        .await;
    assert_eq!(st, 200, "{full}");
    assert_eq!(applied, None);
    assert_eq!(full["message"]["data"], json!(format!("{PREFIX}abc")));

    // Refusals are the usual envelope either way.
    let (st, _, refused) = alice
        .post_preferring(&path, &json!({"data": ""}), "return=minimal")
        .await;
    assert_eq!(st, 400, "{refused}");
    assert_eq!(refused["code"], json!("invalid_input"), "{refused}");
    let m = get_message(&alice, &cid, &mid).await;
    assert_eq!(
        m["data"],
        json!(format!("{PREFIX}abc")),
        "the refusal changed nothing"
    );
}
