//! The test services themselves (issue 6, "Services for tests"): the run's PostgreSQL and
//! Redis that `make test` provides, per-test databases, and the private PostgreSQL and Redis
//! instances that outage tests stop and restart. These fail, never skip, when a service is
//! missing.

use std::net::TcpStream;
use std::time::Duration;

use switchboard_integration::pg_server::{
    psql, test_postgres_url, test_redis_url, PgDatabase, PgServer,
};
use switchboard_integration::redis_server::RedisServer;

fn database_exists(admin_url: &str, name: &str) -> bool {
    let out = psql(
        admin_url,
        &format!("select count(*) from pg_database where datname = '{name}'"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    out == "1"
}

/// The run's database URL with the maintenance database `postgres` in its place.
fn admin_of(url: &str) -> String {
    let (base, rest) = url.rsplit_once('/').expect("a database in the URL");
    let query = rest.find('?').map(|i| &rest[i..]).unwrap_or("");
    format!("{base}/postgres{query}")
}

fn refuses(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().expect("addr"),
        Duration::from_secs(1),
    )
    .is_err()
}

#[test]
fn the_run_has_a_postgres_database_and_a_redis() {
    let url = test_postgres_url();
    assert_eq!(
        psql(&url, "select 1").unwrap_or_else(|e| panic!("{e}")),
        "1"
    );
    let redis = test_redis_url();
    assert!(redis.starts_with("redis://"), "{redis}");
    let addr = redis.trim_start_matches("redis://");
    TcpStream::connect(addr).unwrap_or_else(|e| panic!("Redis at {redis}: {e}"));
}

#[test]
fn a_fresh_database_is_created_and_dropped() {
    let run = test_postgres_url();
    let admin = admin_of(&run);
    let run_db = run
        .rsplit('/')
        .next()
        .expect("db")
        .split('?')
        .next()
        .expect("db");
    let db = PgDatabase::fresh();
    let name = db.name().to_string();
    assert!(
        name.starts_with(&format!("{run_db}_")),
        "{name} is named after the run's database {run_db}"
    );
    assert!(database_exists(&admin, &name));
    assert_eq!(db.query("select current_database()"), name);
    db.query("create table t (x int); insert into t values (42)");
    assert_eq!(db.query("select x from t"), "42");
    let other = PgDatabase::fresh();
    assert_ne!(other.name(), name, "each fresh database is its own");
    // An open connection does not keep it from being dropped.
    let mut held = std::process::Command::new("psql")
        .arg(db.url())
        .args(["-X", "-q", "-c", "select pg_sleep(60)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while psql(
        &admin,
        &format!("select count(*) from pg_stat_activity where datname = '{name}'"),
    )
    .expect("activity")
        == "0"
    {
        assert!(std::time::Instant::now() < deadline, "psql never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(db);
    assert!(!database_exists(&admin, &name), "{name} dropped");
    let _ = held.kill();
    let _ = held.wait();
    drop(other);
}

#[tokio::test]
async fn an_own_postgres_starts_stops_and_starts_again_with_its_data() {
    let started = std::time::Instant::now();
    let mut pg = PgServer::start().await;
    println!("initdb and start took {:.1?}", started.elapsed());
    let port = pg.port();
    assert_ne!(port, 5432, "never the shared server's port");
    assert_eq!(pg.query("select 1"), "1");
    assert_eq!(pg.query("select current_database()"), "switchboard");
    pg.query("create table kept (x int); insert into kept values (7)");

    pg.stop();
    assert!(!pg.is_running());
    assert!(
        refuses(port),
        "port {port} refuses connections when stopped"
    );
    let err = psql(&pg.url(), "select 1").expect_err("no server");
    assert!(err.contains("refused") || err.contains("connect"), "{err}");

    pg.restart().await;
    assert_eq!(pg.port(), port, "same port");
    assert_eq!(pg.query("select x from kept"), "7", "same data");

    // A crash (immediate shutdown) keeps committed data too.
    pg.query("insert into kept values (8)");
    pg.kill();
    assert!(refuses(port));
    pg.restart().await;
    assert_eq!(pg.query("select count(*) from kept"), "2");

    let dir = pg.dir().to_path_buf();
    drop(pg);
    assert!(refuses(port), "stopped on drop");
    assert!(!dir.exists(), "{} removed on drop", dir.display());
}

#[tokio::test]
async fn an_own_redis_stops_and_starts_again_on_its_port() {
    let mut redis = RedisServer::start().await;
    let port = redis.port();
    assert_ne!(port, 6379, "never the shared server's port");
    assert!(redis.is_running());
    TcpStream::connect(("127.0.0.1", port)).expect("connect");
    redis.stop();
    assert!(!redis.is_running());
    assert!(
        refuses(port),
        "port {port} refuses connections when stopped"
    );
    redis.restart().await;
    assert_eq!(redis.port(), port);
    assert!(redis.is_running());
    TcpStream::connect(("127.0.0.1", port)).expect("connect after restart");
    drop(redis);
    assert!(refuses(port), "stopped on drop");
}
