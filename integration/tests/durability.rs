//! SIGKILL and restart on the same database: every answered message is there, channel seqs
//! stay contiguous, cursors keep increasing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard_integration::harness::{cursor_num, cursor_str, TestServer};

const N: usize = 30;

#[tokio::test]
async fn sigkill_restart_keeps_every_answered_message() {
    let mut s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group("durable", &["bob"], json!({})).await;
    let cid = ch["id"].as_str().expect("id").to_owned();
    let ch2 = alice.create_group("durable-2", &["bob"], json!({})).await;
    let cid2 = ch2["id"].as_str().expect("id").to_owned();

    // N sequential posts, each answered.
    let mut answered: Vec<Value> = Vec::new();
    for i in 0..N {
        answered.push(alice.say(&cid, &format!("seq-{i}")).await);
    }
    // Then concurrent posts racing the SIGKILL: whatever was answered must survive.
    let stop = Arc::new(AtomicBool::new(false));
    let mut racers = Vec::new();
    for (who, chan) in [(alice.clone(), cid.clone()), (bob.clone(), cid2.clone())] {
        let stop = stop.clone();
        racers.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 10_000 {
                let answer = who
                    .try_request(
                        Method::POST,
                        &format!("/api/channels/{chan}/messages"),
                        Some(&json!({"data": format!("race-{}-{i}", who.id)})),
                    )
                    .await;
                match answer {
                    Ok((201, body)) => ok.push(body),
                    // Connection refused / reset: the server is gone.
                    Err(_) => break,
                    Ok((st, body)) => panic!("unexpected answer while racing: {st} {body}"),
                }
                i += 1;
            }
            ok
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.kill_hard();
    stop.store(true, Ordering::Relaxed);
    let mut raced: Vec<Value> = Vec::new();
    for r in racers {
        raced.extend(r.await.expect("racer task"));
    }
    eprintln!("{} racing posts were answered before SIGKILL", raced.len());

    s.restart().await;

    // Every answered message is there, by serial, with its data.
    let mut by_channel: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in answered.iter().chain(raced.iter()) {
        by_channel
            .entry(
                r["message"]["channel_id"]
                    .as_str()
                    .expect("channel_id")
                    .to_owned(),
            )
            .or_default()
            .push(r);
    }
    for (chan, posts) in &by_channel {
        let stored = alice.messages(chan).await;
        let stored_by_serial: BTreeMap<String, &Value> = stored
            .iter()
            .map(|m| (m["message_serial"].as_str().expect("serial").to_owned(), m))
            .collect();
        for p in posts {
            let ser = p["message"]["message_serial"].as_str().expect("serial");
            let m = stored_by_serial
                .get(ser)
                .unwrap_or_else(|| panic!("answered message {ser} lost in {chan}"));
            assert_eq!(m["data"], p["message"]["data"]);
            assert_eq!(m["history_serial"], p["message"]["history_serial"]);
        }
        // Seqs contiguous from 1 (no gaps even if unanswered writes were lost or kept).
        let seqs: Vec<i64> = stored
            .iter()
            .map(|m| m["history_serial"].as_i64().expect("seq"))
            .collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "{chan}");
    }

    // A new post continues the seq and takes a cursor after every earlier one.
    let last_seq = alice.messages(&cid).await.len() as i64;
    assert!(last_seq >= N as i64);
    let fresh = alice.say(&cid, "after restart").await;
    assert_eq!(fresh["message"]["history_serial"], json!(last_seq + 1));
    assert_eq!(fresh["event"]["seq"], json!(last_seq + 1));
    assert_eq!(alice.channel(&cid).await["last_seq"], json!(last_seq + 1));

    let log = alice.pull_all(None).await;
    assert_eq!(
        log.last().map(|e| e["id"].clone()),
        Some(fresh["event"]["id"].clone()),
        "the new event is last in cursor order"
    );
    let fresh_cursor = cursor_str(&fresh["event"]["cursor"]);
    for r in answered.iter().chain(raced.iter()) {
        let c = cursor_str(&r["event"]["cursor"]);
        assert!(
            log.iter().any(|e| cursor_str(&e["cursor"]) == c),
            "answered event {c} kept in the log"
        );
        if let (Some(a), Some(b)) = (cursor_num(&c), cursor_num(&fresh_cursor)) {
            assert!(a < b, "cursor {c} < {fresh_cursor}");
        }
    }
    let cursors: Vec<String> = log.iter().map(|e| cursor_str(&e["cursor"])).collect();
    if let Some(nums) = cursors
        .iter()
        .map(|c| cursor_num(c))
        .collect::<Option<Vec<_>>>()
    {
        assert!(nums.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    }
    // A socket resuming from before the crash gets the fresh event after the old ones.
    let resume = cursor_str(&answered[N - 1]["event"]["cursor"]);
    let mut ws = s.ws(&alice.token, Some(&resume)).await;
    let frames = ws
        .collect_until(Duration::from_secs(10), |f| f["id"] == fresh["event"]["id"])
        .await;
    assert!(
        frames.len()
            > raced
                .iter()
                .filter(|r| r["message"]["channel_id"] == json!(cid))
                .count()
    );
}
