//! WebSocket conformance: the Autobahn|Testsuite fuzzing-client cases, sections 1–7 and 9,
//! run by kosoku (PyPI, pinned with hashes in `integration/clients/python/requirements.txt`)
//! against the test-only echo route `/test/echo` of a server started with
//! `SWITCHBOARD_TESTING_ECHO_ROUTE=true`. Every case must end with a passing Autobahn verdict
//! (OK, NON-STRICT or INFORMATIONAL, for the messages and for the close), and the route must
//! not exist on a server started without the flag.
//!
//! kosoku is installed into a venv at `target/pyenv` on first use (python3 with venv and pip
//! is required: without them the test fails, it never skips).
//! Run: `cargo test -p switchboard-integration --test autobahn -- --nocapture`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard_integration::harness::{assert_error, parse_body, TestServer};
use tokio_tungstenite::tungstenite;

/// The sections run, with the number of cases kosoku 0.1.0 has in each: an exact count, so a
/// selection that silently runs less (or a changed pin) fails instead of passing.
const SECTIONS: &[(&str, usize)] = &[
    ("1", 16),
    ("2", 11),
    ("3", 7),
    ("4", 10),
    ("5", 20),
    ("6", 145),
    ("7", 37),
    ("9", 54),
];
/// Autobahn's passing verdicts; anything else (FAILED, UNIMPLEMENTED, WRONG CODE, UNCLEAN,
/// FAILED BY CLIENT, ERROR) fails the test.
const PASSING: &[&str] = &["OK", "NON-STRICT", "INFORMATIONAL"];
/// The whole run takes about 15 s here; this only stops a hung run.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start it ({e})"));
    assert!(
        out.status.success(),
        "{what} failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `kosoku` executable of `target/pyenv`, creating the venv and installing the pinned
/// requirements when they are missing or the requirements file changed.
fn kosoku() -> PathBuf {
    let root = workspace_root();
    let venv = root.join("target/pyenv");
    let requirements = root.join("integration/clients/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .unwrap_or_else(|e| panic!("read {}: {e}", requirements.display()));
    let stamp = venv.join("installed-requirements.txt");
    let exe = venv.join("bin/kosoku");
    if exe.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return exe;
    }
    let python = Command::new("python3").arg("--version").output();
    assert!(
        python.as_ref().is_ok_and(|o| o.status.success()),
        "the Autobahn test needs python3 (3.10 or later) on PATH to install kosoku: {python:?}"
    );
    if !venv.join("bin/python").exists() {
        run(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "python3 -m venv target/pyenv (on Debian: apt-get install python3-venv)",
        );
    }
    run(
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--require-hashes", "--only-binary=:all:", "-r"])
            .arg(&requirements),
        "pip install --require-hashes -r integration/clients/python/requirements.txt",
    );
    assert!(
        exe.exists(),
        "pip installed kosoku but {} is missing",
        exe.display()
    );
    if let Err(e) = std::fs::write(&stamp, &wanted) {
        panic!("write {}: {e}", stamp.display());
    }
    exe
}

/// One case's verdicts from kosoku's `index.json`.
struct Verdict {
    behavior: String,
    close: String,
    report: String,
}

/// `index.json` is `{agent: {case id: {behavior, behaviorClose, reportfile, …}}}`.
fn read_index(dir: &Path) -> BTreeMap<String, Verdict> {
    let path = dir.join("index.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("kosoku wrote no report at {}: {e}", path.display()));
    let index: Value = serde_json::from_str(&text).expect("index.json is JSON");
    let agents = index.as_object().expect("index.json maps agents to cases");
    assert_eq!(agents.len(), 1, "one agent under test: {:?}", agents.keys());
    let mut out = BTreeMap::new();
    for cases in agents.values() {
        for (id, case) in cases
            .as_object()
            .expect("an agent maps case ids to results")
        {
            let field = |k: &str| case[k].as_str().unwrap_or("?").to_owned();
            out.insert(
                id.clone(),
                Verdict {
                    behavior: field("behavior"),
                    close: field("behaviorClose"),
                    report: field("reportfile"),
                },
            );
        }
    }
    out
}

/// Why a case did not pass, from its own report file.
fn explain(dir: &Path, v: &Verdict) -> String {
    let case: Value = std::fs::read_to_string(dir.join(&v.report))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    format!(
        "{} / {}: {} / {} (remote close code {})",
        v.behavior, v.close, case["result"], case["resultClose"], case["remoteCloseCode"]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_sections_1_to_7_and_9_pass() {
    let kosoku = kosoku();
    let server = TestServer::builder()
        .env("SWITCHBOARD_TESTING_ECHO_ROUTE", "true")
        .start()
        .await;
    let reports = tempfile::tempdir().expect("report dir");
    let url = format!("ws://{}/test/echo", server.addr());
    let mut cmd = tokio::process::Command::new(&kosoku);
    cmd.arg(&url).arg("-o").arg(reports.path());
    for (section, _) in SECTIONS {
        cmd.arg("-i").arg(format!("{section}.*"));
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let started = Instant::now();
    let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("kosoku did not finish within {RUN_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("run {}: {e}", kosoku.display()));
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cases = read_index(reports.path());

    // Per section: cases, then message verdicts, then close verdicts.
    let mut failures = Vec::new();
    println!(
        "Autobahn via kosoku 0.1.0 against {url}: {} cases in {took:.1?}",
        cases.len()
    );
    println!("| section | cases | OK | NON-STRICT | INFORMATIONAL | other | close OK | close INFORMATIONAL | close other |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (section, expected) in SECTIONS {
        let in_section: Vec<(&String, &Verdict)> = cases
            .iter()
            .filter(|(id, _)| id.split('.').next() == Some(section))
            .collect();
        let count = |f: &dyn Fn(&Verdict) -> bool| in_section.iter().filter(|(_, v)| f(v)).count();
        println!(
            "| {section} | {} | {} | {} | {} | {} | {} | {} | {} |",
            in_section.len(),
            count(&|v| v.behavior == "OK"),
            count(&|v| v.behavior == "NON-STRICT"),
            count(&|v| v.behavior == "INFORMATIONAL"),
            count(&|v| !PASSING.contains(&v.behavior.as_str())),
            count(&|v| v.close == "OK"),
            count(&|v| v.close == "INFORMATIONAL"),
            count(&|v| !PASSING.contains(&v.close.as_str())),
        );
        if in_section.len() != *expected {
            failures.push(format!(
                "section {section}: {} cases ran, {expected} expected",
                in_section.len()
            ));
        }
        for (id, v) in in_section {
            if !PASSING.contains(&v.behavior.as_str()) || !PASSING.contains(&v.close.as_str()) {
                failures.push(format!("case {id}: {}", explain(reports.path(), v)));
            }
        }
    }
    for (id, v) in &cases {
        if v.behavior == "NON-STRICT" || v.behavior == "INFORMATIONAL" {
            println!("  {id}: {} / {}", v.behavior, v.close);
        }
    }
    assert!(
        failures.is_empty(),
        "Autobahn cases did not pass:\n{}\nkosoku stdout:\n{stdout}\nstderr:\n{stderr}",
        failures.join("\n")
    );
    assert!(
        out.status.success(),
        "every case passed but kosoku exited with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

#[tokio::test]
async fn echo_route_does_not_exist_without_the_flag() {
    let server = TestServer::start().await;
    let (status, text) = server.get_text("/test/echo").await;
    assert_error(
        &(
            status,
            parse_body(status, text.as_bytes(), "GET /test/echo"),
        ),
        404,
        "not_found",
    );
    let url = format!("ws://{}/test/echo", server.addr());
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().clone().unwrap_or_default();
            assert_error(
                &(status, parse_body(status, &body, "upgrade /test/echo")),
                404,
                "not_found",
            );
        }
        Ok(_) => panic!("the echo route accepted a WebSocket without the testing flag"),
        Err(e) => panic!("upgrade to {url}: expected a 404 refusal, got {e}"),
    }
}
