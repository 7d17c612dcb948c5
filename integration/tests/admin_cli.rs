//! The admin CLI works beside a running server on the same database.

use serde_json::json;
use switchboard_integration::harness::*;

#[tokio::test]
async fn cli_creates_workspaces_and_mints_tokens_while_serving() {
    let s = TestServer::start().await;
    let db = s.db_url();
    let (ok, out, err) = s
        .run_cli(&[
            "admin",
            "workspace",
            "create",
            "--name",
            "cli made",
            "--id",
            "424242",
            "--database",
            &db,
        ])
        .await;
    assert!(ok, "workspace create: {err}");
    let created: serde_json::Value =
        serde_json::from_str(out.trim()).expect("create prints the workspace as JSON");
    assert_eq!(created["id"], json!("424242"));
    assert!(created["key"].as_str().is_some_and(|k| !k.is_empty()));

    let (ok, out, _) = s
        .run_cli(&["admin", "workspace", "list", "--database", &db])
        .await;
    assert!(ok);
    assert!(
        out.lines().any(|l| l.starts_with("424242\t")),
        "listed: {out}"
    );

    // A duplicate id is refused and creates nothing.
    let (ok, _, err) = s
        .run_cli(&[
            "admin",
            "workspace",
            "create",
            "--name",
            "again",
            "--id",
            "424242",
            "--database",
            &db,
        ])
        .await;
    assert!(!ok, "duplicate id must fail");
    assert!(err.contains("already exists"), "{err}");

    // A token minted by the CLI authenticates against the running server.
    s.create_entity("cli-user", "CLI user", "human", "member")
        .await;
    let (ok, token, err) = s
        .run_cli(&[
            "admin",
            "token",
            "--workspace",
            &s.app.id,
            "--entity",
            "cli-user",
            "--database",
            &db,
        ])
        .await;
    assert!(ok, "admin token: {err}");
    let me = s.client("cli-user", token.trim()).get("/api/me").await;
    assert_eq!(me.0, 200, "{:?}", me.1);
    assert_eq!(me.1["entity"]["id"], json!("cli-user"));

    // No token for an entity that does not exist.
    let (ok, _, _) = s
        .run_cli(&[
            "admin",
            "token",
            "--workspace",
            &s.app.id,
            "--entity",
            "ghost",
            "--database",
            &db,
        ])
        .await;
    assert!(!ok);
}

#[tokio::test]
async fn prune_needs_one_bound_and_exclusive_cutoffs() {
    let s = TestServer::start().await;
    let db = s.db_url();
    let ws = s.app.id.clone();
    let (ok, _, _) = s
        .run_cli(&[
            "admin",
            "events",
            "prune",
            "--workspace",
            &ws,
            "--database",
            &db,
        ])
        .await;
    assert!(!ok, "no bound must fail");
    let (ok, _, _) = s
        .run_cli(&[
            "admin",
            "events",
            "prune",
            "--workspace",
            &ws,
            "--older-than-days",
            "1",
            "--before",
            "2026-01-01T00:00:00Z",
            "--database",
            &db,
        ])
        .await;
    assert!(!ok, "both cut-offs must fail");
    let (ok, _, _) = s
        .run_cli(&[
            "admin",
            "events",
            "prune",
            "--workspace",
            &ws,
            "--before",
            "yesterday",
            "--database",
            &db,
        ])
        .await;
    assert!(!ok, "a non-RFC3339 cut-off must fail");
    let (ok, out, err) = s
        .run_cli(&[
            "admin",
            "events",
            "prune",
            "--workspace",
            &ws,
            "--older-than-days",
            "0",
            "--database",
            &db,
        ])
        .await;
    assert!(ok, "{err}");
    assert!(out.starts_with("pruned "), "{out}");
}
