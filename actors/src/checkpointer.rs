//! WAL checkpoints of a SQLite store, off the writer's thread.
//!
//! A checkpoint copies the WAL's pages into the database file and fsyncs it. On the writer
//! that stalls every batch queued behind it (ai-stream: ~7 writer checkpoints a second of
//! 4–8 ms each at 4,000 pages). So a thread of its own copies the frames (PASSIVE: it never
//! blocks the writer) every 25 ms while writes come in, and once a second when they do not.
//! The WAL can only start over from its beginning when a write finds every frame copied,
//! which a busy writer rarely does; its own auto-checkpoint, at [`WRITER_CHECKPOINT_PAGES`],
//! then copies the last ≤ 25 ms of frames and lets it restart: it bounds the WAL at about
//! 64 MiB and runs a few times a minute instead of several times a second.
//!
//! Why 25 ms: commits that run while a pass copies are slower, and the longer the pass, the
//! more of them. In ai-stream (5,000 appends/s) passes every 1 s / 100 / 50 / 25 ms gave a
//! p99 of 13–21 / 8–16 / 7–10 / 6–12 ms, with the same server CPU; a pass at 25 ms reads and
//! writes ~400 pages (~12 ms of syscalls; its fsync ~0.15 ms). Which resource the two share
//! (a core, the page cache, the disk) was not pinned down; this thread at nice 10 made the
//! p99 worse (`docs/performance.md`, "2026-12-07, 09:10–").

use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::Duration;

use diesel::sql_types::Integer;
use diesel::{QueryableByName, RunQueryDsl};

use crate::store::{AnyConnection, DbPool};

/// The writer's own checkpoint (SQLite's `wal_autocheckpoint`), in WAL pages of 4 KiB.
pub const WRITER_CHECKPOINT_PAGES: u32 = 16_000;
/// Between passes while the WAL grows: short, so that each pass is short.
const BUSY_EVERY: Duration = Duration::from_millis(25);
/// Between passes while it does not.
const IDLE_EVERY: Duration = Duration::from_secs(1);

/// What `PRAGMA wal_checkpoint` answers.
#[derive(QueryableByName, Debug, Clone, Copy, PartialEq, Eq)]
struct Pass {
    /// 1 when it could not run (another checkpoint held the lock).
    #[diesel(sql_type = Integer)]
    busy: i32,
    /// Frames in the WAL.
    #[diesel(sql_type = Integer)]
    log: i32,
    /// Frames copied into the database, this pass or earlier.
    #[diesel(sql_type = Integer)]
    checkpointed: i32,
}

/// The wait before the next pass: short while frames keep arriving (or some were left behind),
/// long once a pass finds the WAL as the previous one left it, all copied.
fn next_pass_in(previous: Option<Pass>, now: Pass) -> Duration {
    let settled = now.busy == 0 && now.checkpointed == now.log;
    let unchanged = previous.is_some_and(|p| p.log == now.log);
    if settled && unchanged {
        IDLE_EVERY
    } else {
        BUSY_EVERY
    }
}

/// Runs PASSIVE checkpoints on a connection of its own until the returned sender is dropped
/// (then runs a last one). PostgreSQL stores have no WAL of ours to copy: `None`.
pub fn start(pool: &DbPool) -> Result<Option<Sender<()>>, String> {
    if pool.is_postgres() {
        return Ok(None);
    }
    let mut conn = pool
        .get()
        .map_err(|e| format!("checkpoint connection: {e}"))?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("checkpoint".into())
        .spawn(move || {
            let mut previous = None;
            let mut wait = BUSY_EVERY;
            loop {
                let last = matches!(
                    stopped.recv_timeout(wait),
                    Err(RecvTimeoutError::Disconnected)
                );
                let pass = match &mut *conn {
                    AnyConnection::Sqlite(c) => {
                        diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)").get_result::<Pass>(c)
                    }
                    AnyConnection::Pg(_) => return,
                };
                match pass {
                    Ok(p) => {
                        wait = next_pass_in(previous, p);
                        previous = Some(p);
                    }
                    Err(e) => {
                        log::warn!("WAL checkpoint failed: {e}");
                        wait = IDLE_EVERY;
                    }
                }
                if last {
                    return;
                }
            }
        })
        .map_err(|e| format!("checkpoint thread: {e}"))?;
    Ok(Some(stop))
}

/// At a clean exit, once the writer has stopped: copies every frame into the database file
/// and empties the WAL (`TRUNCATE`), so the database file alone holds every commit (a copy
/// of it taken after a stop is whole). `Ok(false)` when a reader kept it from finishing.
pub fn truncate_at_exit(pool: &DbPool) -> Result<bool, String> {
    if pool.is_postgres() {
        return Ok(true);
    }
    let mut conn = pool.get().map_err(|e| e.to_string())?;
    match &mut *conn {
        AnyConnection::Sqlite(c) => diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)")
            .get_result::<Pass>(c)
            .map(|p| p.busy == 0)
            .map_err(|e| e.to_string()),
        AnyConnection::Pg(_) => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(busy: i32, log: i32, checkpointed: i32) -> Pass {
        Pass {
            busy,
            log,
            checkpointed,
        }
    }

    #[test]
    fn passes_come_often_while_the_wal_grows_and_rarely_once_it_is_copied_and_still() {
        // The first pass has nothing to compare with.
        assert_eq!(next_pass_in(None, pass(0, 0, 0)), BUSY_EVERY);
        // Frames arrived since the last pass.
        assert_eq!(
            next_pass_in(Some(pass(0, 10, 10)), pass(0, 40, 40)),
            BUSY_EVERY
        );
        // The WAL started over (fewer frames than before): writes go on.
        assert_eq!(
            next_pass_in(Some(pass(0, 900, 900)), pass(0, 12, 12)),
            BUSY_EVERY
        );
        // Some frames could not be copied yet (a reader holds an older snapshot).
        assert_eq!(
            next_pass_in(Some(pass(0, 40, 40)), pass(0, 40, 30)),
            BUSY_EVERY
        );
        // Another checkpoint held the lock.
        assert_eq!(
            next_pass_in(Some(pass(0, 40, 40)), pass(1, 40, 40)),
            BUSY_EVERY
        );
        // Nothing new and all copied.
        assert_eq!(
            next_pass_in(Some(pass(0, 40, 40)), pass(0, 40, 40)),
            IDLE_EVERY
        );
    }

    #[test]
    fn a_pass_reports_the_frames_it_copied() {
        use diesel::connection::SimpleConnection;
        let (_dir, pool) = crate::store::test_pool(2);
        let mut conn = pool.get().expect("conn");
        let AnyConnection::Sqlite(c) = &mut *conn else {
            panic!("sqlite")
        };
        c.batch_execute(
            "PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (x); INSERT INTO t VALUES (1);",
        )
        .expect("write");
        let first = diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)")
            .get_result::<Pass>(c)
            .expect("pass");
        assert_eq!(first.busy, 0);
        assert!(first.log > 0, "{first:?}");
        assert_eq!(first.checkpointed, first.log);
        let again = diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)")
            .get_result::<Pass>(c)
            .expect("pass");
        assert_eq!(next_pass_in(Some(first), again), IDLE_EVERY);
    }
}
