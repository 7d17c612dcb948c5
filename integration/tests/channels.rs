//! Channels: group creation rules, direct channels, visibility, join policies, PATCH,
//! member management and the caller's read state in `GET /api/channels`.

use serde_json::{json, Value};
use switchboard_integration::harness::{assert_error, ids, ApiClient, TestServer};

fn members_of(channel: &Value) -> Vec<String> {
    let mut m = ids(&channel["members"]);
    m.sort();
    m
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
    out.sort();
    out
}

async fn visible_ids(c: &ApiClient) -> Vec<String> {
    c.channels()
        .await
        .iter()
        .map(|ch| ch["id"].as_str().expect("channel id").to_owned())
        .collect()
}

#[tokio::test]
async fn group_creation_rules() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;

    // Defaults: creator added to members and modify_members, private, invite-only.
    let ch = alice.create_group("general", &["bob"], json!({})).await;
    assert!(
        ch["id"].as_str().is_some_and(|id| id.starts_with("chn_")),
        "{ch}"
    );
    assert_eq!(ch["channel_type"], json!("group"), "{ch}");
    assert_eq!(members_of(&ch), sorted(&["alice", "bob"]), "{ch}");
    assert_eq!(
        ids(&ch["permissions"]["modify_members"]),
        vec!["alice"],
        "{ch}"
    );
    assert_eq!(ch["permissions"]["visibility"], json!("private"), "{ch}");
    assert_eq!(
        ch["permissions"]["join_policy"],
        json!("invite-only"),
        "{ch}"
    );
    assert_eq!(ch["immutable"], json!(false), "{ch}");
    assert_eq!(ch["created_by"], json!("alice"), "{ch}");
    assert!(ch["archived_at"].is_null(), "{ch}");
    assert_eq!(ch["last_seq"], json!(0), "{ch}");

    // Fewer than 2 members counting the creator.
    assert_error(
        &alice
            .post("/api/channels", &json!({"name": "solo", "members": []}))
            .await,
        400,
        "invalid_input",
    );
    assert_error(
        &alice.post("/api/channels", &json!({"name": "solo2"})).await,
        400,
        "invalid_input",
    );
    // Listing only yourself does not count twice.
    assert_error(
        &alice
            .post(
                "/api/channels",
                &json!({"name": "solo3", "members": ["alice"]}),
            )
            .await,
        400,
        "invalid_input",
    );

    // Name rules.
    let bad_names = [
        String::new(),
        "a".repeat(101),
        "has space".to_owned(),
        "slash/no".to_owned(),
        "hash#no".to_owned(),
        "quote\"no".to_owned(),
        "é-accent".to_owned(),
    ];
    for name in &bad_names {
        assert_error(
            &alice
                .post("/api/channels", &json!({"name": name, "members": ["bob"]}))
                .await,
            400,
            "invalid_input",
        );
    }
    let max_name = "n".repeat(100);
    alice.create_group(&max_name, &["bob"], json!({})).await;
    alice
        .create_group("All_the:allowed=chars@x,y.z;w-0", &["bob"], json!({}))
        .await;

    // Duplicate name in the workspace.
    assert_error(
        &alice
            .post(
                "/api/channels",
                &json!({"name": "general", "members": ["bob"]}),
            )
            .await,
        409,
        "conflict",
    );

    // Options honoured at creation.
    let ch2 = alice
        .create_group(
            "tagged",
            &["bob"],
            json!({"description": "d", "visibility": "public", "join_policy": "open",
                   "tags": ["x"], "metadata": {"k": 1}, "immutable": true}),
        )
        .await;
    assert_eq!(ch2["description"], json!("d"), "{ch2}");
    assert_eq!(ch2["permissions"]["visibility"], json!("public"), "{ch2}");
    assert_eq!(ch2["permissions"]["join_policy"], json!("open"), "{ch2}");
    assert_eq!(ch2["tags"], json!(["x"]), "{ch2}");
    assert_eq!(ch2["metadata"], json!({"k": 1}), "{ch2}");
    assert_eq!(ch2["immutable"], json!(true), "{ch2}");

    // Rejected creations left nothing behind: alice sees exactly the 4 channels she made.
    let mut names: Vec<String> = alice
        .channels()
        .await
        .iter()
        .map(|c| c["name"].as_str().expect("name").to_owned())
        .collect();
    names.sort();
    let mut expected = vec![
        "All_the:allowed=chars@x,y.z;w-0".to_owned(),
        "general".to_owned(),
        max_name,
        "tagged".to_owned(),
    ];
    expected.sort();
    assert_eq!(names, expected);

    // A guest creates no channel.
    let guest = s.user("gus", "human", "guest").await;
    assert_error(
        &guest
            .post(
                "/api/channels",
                &json!({"name": "guests", "members": ["bob"]}),
            )
            .await,
        403,
        "forbidden",
    );
}

#[tokio::test]
async fn member_cap_is_1000() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    // 1001 other entities, created 16 at a time.
    let ids: Vec<String> = (0..1001).map(|i| format!("m{i:04}")).collect();
    for chunk in ids.chunks(16) {
        let futs = chunk
            .iter()
            .map(|id| s.create_entity(id, id, "human", "member"));
        futures_util::future::join_all(futs).await;
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();

    // 1001 listed → over the cap.
    assert_error(
        &alice
            .post("/api/channels", &json!({"name": "big", "members": refs}))
            .await,
        400,
        "limit_exceeded",
    );
    // 1000 listed + creator = 1001 members → over the cap.
    assert_error(
        &alice
            .post(
                "/api/channels",
                &json!({"name": "big", "members": &refs[..1000]}),
            )
            .await,
        400,
        "limit_exceeded",
    );
    // 999 listed + creator = exactly 1000 → fine.
    let ch = alice.create_group("big", &refs[..999], json!({})).await;
    assert_eq!(ch["members"].as_array().map(Vec::len), Some(1000));
    // Adding one more → over the cap, and nothing changed.
    let id = ch["id"].as_str().expect("id");
    assert_error(
        &alice
            .post(
                &format!("/api/channels/{id}/members"),
                &json!({"entity_id": refs[1000]}),
            )
            .await,
        400,
        "limit_exceeded",
    );
    let after = alice.channel(id).await;
    assert_eq!(after["members"].as_array().map(Vec::len), Some(1000));
}

#[tokio::test]
async fn direct_channels() {
    let s = TestServer::start().await;
    let alice = s.user("zed", "human", "member").await;
    let bob = s.user("amy", "human", "member").await;
    s.create_entity("carl", "Carl", "human", "member").await;

    let (st1, first) = alice
        .post("/api/direct-channels", &json!({"entity_id": "amy"}))
        .await;
    assert_eq!(st1, 201, "first direct-channel call creates: {first}");
    let ch = first["channel"].clone();
    assert_eq!(ch["channel_type"], json!("direct"), "{ch}");
    assert_eq!(
        ch["name"],
        json!("amy:zed"),
        "sorted ids joined by ':': {ch}"
    );
    assert_eq!(members_of(&ch), sorted(&["amy", "zed"]), "{ch}");
    assert_eq!(ch["permissions"]["visibility"], json!("private"), "{ch}");
    assert_eq!(
        ch["permissions"]["join_policy"],
        json!("invite-only"),
        "{ch}"
    );
    assert_eq!(ch["permissions"]["modify_members"], json!([]), "{ch}");
    let id = ch["id"].as_str().expect("id").to_owned();

    // Find-or-create: same channel from both sides.
    let (st2, again) = alice
        .post("/api/direct-channels", &json!({"entity_id": "amy"}))
        .await;
    assert_eq!(st2, 200, "existing pair answers 200: {again}");
    assert_eq!(again["channel"]["id"], json!(id));
    let other_side = bob.direct("zed").await;
    assert_eq!(other_side["id"], json!(id));
    // Only one direct channel exists for the pair.
    let dms: Vec<Value> = alice
        .channels()
        .await
        .into_iter()
        .filter(|c| c["channel_type"] == json!("direct"))
        .collect();
    assert_eq!(dms.len(), 1, "{dms:?}");

    // Membership can never change.
    assert_error(
        &alice
            .post(
                &format!("/api/channels/{id}/members"),
                &json!({"entity_id": "carl"}),
            )
            .await,
        409,
        "direct_channel_membership",
    );
    assert_error(
        &alice
            .delete(&format!("/api/channels/{id}/members/amy"))
            .await,
        409,
        "direct_channel_membership",
    );
    assert_error(
        &bob.post(&format!("/api/channels/{id}/leave"), &json!({}))
            .await,
        409,
        "direct_channel_membership",
    );
    assert_eq!(
        members_of(&alice.channel(&id).await),
        sorted(&["amy", "zed"])
    );

    // Invisible to a third party.
    let carl = s.client("carl", &s.token_for("carl"));
    assert_error(
        &carl.get(&format!("/api/channels/{id}")).await,
        404,
        "not_found",
    );
    assert!(!visible_ids(&carl).await.contains(&id));

    // A direct channel with yourself is invalid.
    assert_error(
        &alice
            .post("/api/direct-channels", &json!({"entity_id": "zed"}))
            .await,
        400,
        "invalid_input",
    );

    // The direct name is exempt from the 100-character limit (two 64-byte ids).
    let long_a = "a".repeat(64);
    let long_b = "b".repeat(64);
    s.create_entity(&long_a, "A", "human", "member").await;
    s.create_entity(&long_b, "B", "human", "member").await;
    let la = s.client(&long_a, &s.token_for(&long_a));
    let long = la.direct(&long_b).await;
    assert_eq!(long["name"], json!(format!("{long_a}:{long_b}")), "{long}");
}

#[tokio::test]
async fn visibility_and_membership_errors() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    s.create_entity("bob", "Bob", "human", "member").await;
    let carl = s.user("carl", "human", "member").await;

    let private = alice.create_group("secret", &["bob"], json!({})).await;
    let pid = private["id"].as_str().expect("id").to_owned();
    let public = alice
        .create_group("lobby", &["bob"], json!({"visibility": "public"}))
        .await;
    let pubid = public["id"].as_str().expect("id").to_owned();
    alice.say(&pubid, "hello lobby").await;

    // Private: not visible at all to a non-member.
    assert_error(
        &carl.get(&format!("/api/channels/{pid}")).await,
        404,
        "not_found",
    );
    assert_error(
        &carl.get(&format!("/api/channels/{pid}/messages")).await,
        404,
        "not_found",
    );
    assert_error(
        &carl
            .post(
                &format!("/api/channels/{pid}/messages"),
                &json!({"data": "x"}),
            )
            .await,
        404,
        "not_found",
    );
    assert_error(
        &carl
            .post(&format!("/api/channels/{pid}/join"), &json!({}))
            .await,
        404,
        "not_found",
    );
    let carl_sees = visible_ids(&carl).await;
    assert!(!carl_sees.contains(&pid), "{carl_sees:?}");

    // Public: visible and readable, but writes need membership.
    assert!(carl_sees.contains(&pubid), "{carl_sees:?}");
    let seen = carl.channel(&pubid).await;
    assert_eq!(seen["name"], json!("lobby"));
    let msgs = carl.messages(&pubid).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["data"], json!("hello lobby"));
    assert_error(
        &carl
            .post(
                &format!("/api/channels/{pubid}/messages"),
                &json!({"data": "x"}),
            )
            .await,
        403,
        "not_a_member",
    );
    // The rejected write changed nothing.
    assert_eq!(carl.messages(&pubid).await.len(), 1);

    // Unknown channel id → 404.
    assert_error(
        &carl
            .get("/api/channels/chn_01ARZ3NDEKTSV4RRFFQ69G5FAV")
            .await,
        404,
        "not_found",
    );
}

#[tokio::test]
async fn join_policies_and_requests() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let carl = s.user("carl", "human", "member").await;
    let dana = s.user("dana", "human", "member").await;

    // open + public: join at once, then write, then leave.
    let open = alice
        .create_group(
            "open-room",
            &["bob"],
            json!({"visibility": "public", "join_policy": "open"}),
        )
        .await;
    let oid = open["id"].as_str().expect("id").to_owned();
    let (st, _) = carl
        .post(&format!("/api/channels/{oid}/join"), &json!({}))
        .await;
    assert_eq!(st, 200);
    assert!(members_of(&carl.channel(&oid).await).contains(&"carl".to_owned()));
    carl.say(&oid, "joined").await;
    let (st, _) = carl
        .post(&format!("/api/channels/{oid}/leave"), &json!({}))
        .await;
    assert_eq!(st, 200);
    assert!(!members_of(&alice.channel(&oid).await).contains(&"carl".to_owned()));
    assert_error(
        &carl
            .post(
                &format!("/api/channels/{oid}/messages"),
                &json!({"data": "x"}),
            )
            .await,
        403,
        "not_a_member",
    );

    // invite-only + public: join refused; a modify_members member adds you.
    let inv = alice
        .create_group(
            "invite-room",
            &["bob"],
            json!({"visibility": "public", "join_policy": "invite-only"}),
        )
        .await;
    let iid = inv["id"].as_str().expect("id").to_owned();
    assert_error(
        &carl
            .post(&format!("/api/channels/{iid}/join"), &json!({}))
            .await,
        403,
        "forbidden",
    );
    assert!(!members_of(&alice.channel(&iid).await).contains(&"carl".to_owned()));
    // bob is a member but not in modify_members.
    assert_error(
        &bob.post(
            &format!("/api/channels/{iid}/members"),
            &json!({"entity_id": "carl"}),
        )
        .await,
        403,
        "cannot_modify_members",
    );
    assert_error(
        &bob.delete(&format!("/api/channels/{iid}/members/alice"))
            .await,
        403,
        "cannot_modify_members",
    );
    let (st, _) = alice
        .post(
            &format!("/api/channels/{iid}/members"),
            &json!({"entity_id": "carl"}),
        )
        .await;
    assert!(st == 200 || st == 201, "add member: {st}");
    assert!(members_of(&alice.channel(&iid).await).contains(&"carl".to_owned()));
    carl.say(&iid, "invited").await;
    let (st, _) = alice
        .delete(&format!("/api/channels/{iid}/members/carl"))
        .await;
    assert_eq!(st, 200);
    assert!(!members_of(&alice.channel(&iid).await).contains(&"carl".to_owned()));

    // request + public: a join request, approved or rejected by modify_members.
    let req = alice
        .create_group(
            "request-room",
            &["bob"],
            json!({"visibility": "public", "join_policy": "request"}),
        )
        .await;
    let rid = req["id"].as_str().expect("id").to_owned();
    let mut alice_ws = s.ws(&alice.token, None).await;
    let (st, body) = carl
        .post(&format!("/api/channels/{rid}/join"), &json!({}))
        .await;
    assert!(
        st == 200 || st == 202,
        "join request recorded (200 or 202): {st} {body}"
    );
    if let Some(status) = body.get("status") {
        assert_eq!(status, &json!("requested"), "{body}");
    }
    assert!(!members_of(&alice.channel(&rid).await).contains(&"carl".to_owned()));
    // alice (modify_members) is told.
    let frames = alice_ws
        .collect_until(std::time::Duration::from_secs(10), |f| {
            f["type"] == json!("channel.join_requested")
        })
        .await;
    let ev = frames.last().expect("join_requested event");
    assert_eq!(ev["channel_id"], json!(rid), "{ev}");
    assert_eq!(ev["payload"]["entity_id"], json!("carl"), "{ev}");

    let (st, list) = alice
        .get(&format!("/api/channels/{rid}/join-requests"))
        .await;
    assert_eq!(st, 200, "{list}");
    let requesters: Vec<&str> = list["join_requests"]
        .as_array()
        .unwrap_or_else(|| panic!("join_requests is an array: {list}"))
        .iter()
        .map(|r| r["entity_id"].as_str().expect("join request entity_id"))
        .collect();
    assert_eq!(requesters, vec!["carl"], "{list}");
    // bob may not see or act on requests.
    assert_error(
        &bob.post(
            &format!("/api/channels/{rid}/join-requests/carl/approve"),
            &json!({}),
        )
        .await,
        403,
        "cannot_modify_members",
    );
    assert!(!members_of(&alice.channel(&rid).await).contains(&"carl".to_owned()));
    let (st, _) = alice
        .post(
            &format!("/api/channels/{rid}/join-requests/carl/approve"),
            &json!({}),
        )
        .await;
    assert_eq!(st, 200);
    assert!(members_of(&alice.channel(&rid).await).contains(&"carl".to_owned()));
    carl.say(&rid, "approved").await;

    let (st, _) = dana
        .post(&format!("/api/channels/{rid}/join"), &json!({}))
        .await;
    assert!(st == 200 || st == 202, "{st}");
    let (st, _) = alice
        .post(
            &format!("/api/channels/{rid}/join-requests/dana/reject"),
            &json!({}),
        )
        .await;
    assert_eq!(st, 200);
    assert!(!members_of(&alice.channel(&rid).await).contains(&"dana".to_owned()));
    let (_, list) = alice
        .get(&format!("/api/channels/{rid}/join-requests"))
        .await;
    assert_eq!(list["join_requests"], json!([]), "{list}");
    assert_error(
        &dana
            .post(
                &format!("/api/channels/{rid}/messages"),
                &json!({"data": "x"}),
            )
            .await,
        403,
        "not_a_member",
    );
    // Approving a request that does not exist.
    assert_error(
        &alice
            .post(
                &format!("/api/channels/{rid}/join-requests/dana/approve"),
                &json!({}),
            )
            .await,
        404,
        "not_found",
    );
}

#[tokio::test]
async fn patch_by_modify_members_only() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group("patchable", &["bob"], json!({})).await;
    let id = ch["id"].as_str().expect("id").to_owned();

    assert_error(
        &bob.patch(
            &format!("/api/channels/{id}"),
            &json!({"description": "bob was here"}),
        )
        .await,
        403,
        "cannot_modify_members",
    );
    assert_eq!(alice.channel(&id).await["description"], ch["description"]);

    let (st, body) = alice
        .patch(
            &format!("/api/channels/{id}"),
            &json!({"name": "renamed", "description": "new desc", "visibility": "public",
                    "join_policy": "request", "tags": ["a", "b"], "metadata": {"m": true},
                    "modify_members": ["alice", "bob"]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let got = &body["channel"];
    assert_eq!(got["name"], json!("renamed"), "{body}");
    assert_eq!(got["description"], json!("new desc"), "{body}");
    assert_eq!(got["permissions"]["visibility"], json!("public"), "{body}");
    assert_eq!(
        got["permissions"]["join_policy"],
        json!("request"),
        "{body}"
    );
    assert_eq!(got["tags"], json!(["a", "b"]), "{body}");
    assert_eq!(got["metadata"], json!({"m": true}), "{body}");
    let mut mm = ids(&got["permissions"]["modify_members"]);
    mm.sort();
    assert_eq!(mm, sorted(&["alice", "bob"]));
    // The change is durable and visible to others.
    assert_eq!(bob.channel(&id).await["name"], json!("renamed"));
    // bob is now allowed.
    let (st, body) = bob
        .patch(
            &format!("/api/channels/{id}"),
            &json!({"description": "by bob"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["channel"]["description"], json!("by bob"));

    // Invalid patch values change nothing.
    assert_error(
        &alice
            .patch(&format!("/api/channels/{id}"), &json!({"name": "bad name"}))
            .await,
        400,
        "invalid_input",
    );
    assert_error(
        &alice
            .patch(
                &format!("/api/channels/{id}"),
                &json!({"visibility": "secret"}),
            )
            .await,
        400,
        "invalid_input",
    );
    assert_eq!(alice.channel(&id).await["name"], json!("renamed"));

    // Archive.
    let (st, body) = alice
        .patch(&format!("/api/channels/{id}"), &json!({"archived": true}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert!(body["channel"]["archived_at"].is_string(), "{body}");
}

#[tokio::test]
async fn channel_list_carries_read_state() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let ch = alice.create_group("reads", &["bob"], json!({})).await;
    let id = ch["id"].as_str().expect("id").to_owned();
    for i in 0..3 {
        alice.say(&id, &format!("m{i}")).await;
    }
    let find = |list: Vec<Value>| {
        list.into_iter()
            .find(|c| c["id"] == json!(id))
            .expect("channel in list")
    };
    let c = find(bob.channels().await);
    assert_eq!(c["last_seq"], json!(3), "{c}");
    assert_eq!(c["last_read_seq"], json!(0), "{c}");
    assert_eq!(c["unread_count"], json!(3), "{c}");

    let (st, _) = bob
        .post(&format!("/api/channels/{id}/read"), &json!({"seq": 2}))
        .await;
    assert_eq!(st, 200);
    let c = find(bob.channels().await);
    assert_eq!(c["last_read_seq"], json!(2), "{c}");
    assert_eq!(c["unread_count"], json!(1), "{c}");
    // Per caller: alice's pointer did not move with bob's.
    let single = bob.channel(&id).await;
    assert_eq!(single["last_read_seq"], json!(2), "{single}");
}
