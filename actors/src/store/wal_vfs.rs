//! A SQLite VFS that hands each commit's WAL frames to the kernel in one `pwrite`.
//!
//! SQLite writes a WAL frame as two writes, its 24-byte header and then its page, so a
//! commit of 11 pages is 22 `pwrite`s before its `fdatasync`. On the build VM each `pwrite`
//! costs ~4 µs of kernel time whatever its size: a Python loop writing 17 frames that way
//! and syncing took 265–340 µs, the same bytes in one `pwrite` 135–168 µs
//! (`docs/performance.md`, "2026-12-07, 07:00–").
//!
//! This VFS wraps the default one. Every file but a WAL passes straight through (the real
//! file is opened in SQLite's own allocation). A WAL file keeps the writes that extend one
//! contiguous run in a buffer, and writes the run with one `pwrite` before anything that
//! could look at the file: `xSync`, `xRead`, `xFileSize`, `xTruncate`, `xFileControl`,
//! `xClose`, a write elsewhere, or a run past [`MAX_RUN`].
//!
//! It is safe only where every run of WAL writes ends in an `xSync` before another
//! connection can read or write those frames: other connections learn of new frames from
//! the WAL index, which `sqlite3WalFrames` updates right after the commit's `xSync`, and
//! the next writer writes after the frames the index names. Two settings make it so:
//! - `synchronous = FULL`: every commit syncs. So `establish` opens through this VFS only
//!   for [`Durability::Full`](super::Durability::Full); with `normal` it uses the default.
//! - `cache_spill = OFF` ([`PRAGMAS`]): a transaction never writes frames before its
//!   commit. A spilled transaction that then rolled back would leave frames in the run past
//!   the WAL's end, and another connection could write its own commit there before this
//!   one flushed the stale run over it. Without spills a transaction larger than the page
//!   cache keeps its pages in memory until it commits (the writer's batches are far smaller).

use std::ffi::{c_int, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libsqlite3_sys as ffi;

/// The name SQLite knows the VFS by (`?vfs=` of a `file:` URI).
const NAME: &CStr = c"switchboard-wal";
/// The longest run: the unix VFS masks the length of one write to 17 bits (`nBuf &=
/// 0x1ffff` in `seekAndWriteFd`), so a write must stay under 128 KiB. 120 KiB holds the
/// 29 frames of 4 KiB pages of a larger commit.
const MAX_RUN: usize = 120 * 1024;

/// Run on every connection opened through this VFS, before its first write.
pub const PRAGMAS: &str = "PRAGMA cache_spill = OFF;";

/// `pwrite`s the WAL files of this process handed to the kernel, and the writes SQLite asked
/// for: the ratio is what the buffering saved.
pub static WAL_WRITES: AtomicU64 = AtomicU64::new(0);
pub static WAL_WRITES_ASKED: AtomicU64 = AtomicU64::new(0);

/// Registers the VFS once (not as the default); `false` when SQLite refused it.
pub fn register() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find(NULL) answers the default VFS, which lives as long as the
        // process; the copy made from it is leaked, so it too outlives every connection.
        unsafe {
            let real = ffi::sqlite3_vfs_find(ptr::null());
            if real.is_null() {
                return false;
            }
            let mut vfs: ffi::sqlite3_vfs = ptr::read(real);
            vfs.szOsFile = (std::mem::size_of::<WalFile>() as c_int) + (*real).szOsFile;
            vfs.pNext = ptr::null_mut();
            vfs.zName = NAME.as_ptr();
            vfs.pAppData = real.cast();
            vfs.xOpen = Some(open);
            let vfs = Box::leak(Box::new(vfs));
            ffi::sqlite3_vfs_register(vfs, 0) == ffi::SQLITE_OK
        }
    })
}

/// The `file:` URI opening `path` through this VFS, or `None` when it is not registered or
/// `path` is not a plain file path.
pub fn uri(path: &str) -> Option<String> {
    if path.is_empty() || path.starts_with(':') || path.starts_with("file:") || !register() {
        return None;
    }
    let mut out = String::with_capacity(path.len() + 32);
    out.push_str("file:");
    for c in path.chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out.push_str("?vfs=");
    out.push_str(NAME.to_str().unwrap_or_default());
    Some(out)
}

/// A WAL file: SQLite's file header, the pending run, then the real file in the same
/// allocation (`szOsFile` bytes, 8-aligned).
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    run: Vec<u8>,
    run_at: i64,
}

fn real_of(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY (of the callers): `f` is a `WalFile` allocated with room for the real file
    // right after it.
    f.cast::<u8>()
        .wrapping_add(std::mem::size_of::<WalFile>())
        .cast()
}

/// The real file's methods; SQLite sets them on a successful open.
unsafe fn methods(real: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    &*(*real).pMethods
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real_vfs = (*vfs).pAppData.cast::<ffi::sqlite3_vfs>();
    let Some(real_open) = (*real_vfs).xOpen else {
        return ffi::SQLITE_CANTOPEN;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Not a WAL: the real file takes SQLite's allocation as it is.
        return real_open(real_vfs, name, file, flags, out_flags);
    }
    let f = file.cast::<WalFile>();
    ptr::write(
        f,
        WalFile {
            base: ffi::sqlite3_file {
                pMethods: ptr::null(),
            },
            run: Vec::new(),
            run_at: 0,
        },
    );
    let real = real_of(file);
    (*real).pMethods = ptr::null();
    let rc = real_open(real_vfs, name, real, flags, out_flags);
    if rc == ffi::SQLITE_OK && !(*real).pMethods.is_null() {
        (*f).base.pMethods = &WAL_METHODS;
        return rc;
    }
    // SQLite calls no xClose on a file whose open failed: close and free it here.
    if !(*real).pMethods.is_null() {
        if let Some(close) = methods(real).xClose {
            close(real);
        }
    }
    ptr::drop_in_place(f);
    if rc == ffi::SQLITE_OK {
        ffi::SQLITE_CANTOPEN
    } else {
        rc
    }
}

/// Writes the pending run, if any.
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    let f = file.cast::<WalFile>();
    if (*f).run.is_empty() {
        return ffi::SQLITE_OK;
    }
    let real = real_of(file);
    let Some(write) = methods(real).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let Ok(len) = c_int::try_from((*f).run.len()) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    WAL_WRITES.fetch_add(1, Ordering::Relaxed);
    let rc = write(real, (*f).run.as_ptr().cast(), len, (*f).run_at);
    (*f).run.clear();
    rc
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amt: c_int,
    at: ffi::sqlite3_int64,
) -> c_int {
    WAL_WRITES_ASKED.fetch_add(1, Ordering::Relaxed);
    let f = file.cast::<WalFile>();
    let len = usize::try_from(amt).unwrap_or(0);
    let run = &mut (*f).run;
    let extends = (*f).run_at + run.len() as i64 == at;
    if !run.is_empty() && (!extends || run.len() + len > MAX_RUN) {
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if len > MAX_RUN {
        let real = real_of(file);
        WAL_WRITES.fetch_add(1, Ordering::Relaxed);
        return match methods(real).xWrite {
            Some(write) => write(real, data, amt, at),
            None => ffi::SQLITE_IOERR_WRITE,
        };
    }
    let run = &mut (*f).run;
    if run.is_empty() {
        (*f).run_at = at;
    }
    run.extend_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), len));
    ffi::SQLITE_OK
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let flushed = flush(file);
    let real = real_of(file);
    let closed = match methods(real).xClose {
        Some(close) => close(real),
        None => ffi::SQLITE_OK,
    };
    ptr::drop_in_place(file.cast::<WalFile>());
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

/// Writes the pending run, then calls the real file's method.
unsafe fn after_flush(
    file: *mut ffi::sqlite3_file,
    call: impl FnOnce(&ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) -> c_int,
) -> c_int {
    let rc = flush(file);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let real = real_of(file);
    call(methods(real), real)
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    out: *mut c_void,
    amt: c_int,
    at: ffi::sqlite3_int64,
) -> c_int {
    after_flush(file, |m, real| {
        m.xRead
            .map_or(ffi::SQLITE_IOERR_READ, |f| f(real, out, amt, at))
    })
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    after_flush(file, |m, real| {
        m.xTruncate
            .map_or(ffi::SQLITE_IOERR_TRUNCATE, |f| f(real, size))
    })
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    after_flush(file, |m, real| {
        m.xSync.map_or(ffi::SQLITE_IOERR_FSYNC, |f| f(real, flags))
    })
}

unsafe extern "C" fn file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    after_flush(file, |m, real| {
        m.xFileSize
            .map_or(ffi::SQLITE_IOERR_FSTAT, |f| f(real, size))
    })
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let real = real_of(file);
    methods(real)
        .xLock
        .map_or(ffi::SQLITE_OK, |f| f(real, level))
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let real = real_of(file);
    methods(real)
        .xUnlock
        .map_or(ffi::SQLITE_OK, |f| f(real, level))
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    let real = real_of(file);
    match methods(real).xCheckReservedLock {
        Some(f) => f(real, out),
        None => {
            *out = 0;
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    after_flush(file, |m, real| {
        m.xFileControl
            .map_or(ffi::SQLITE_NOTFOUND, |f| f(real, op, arg))
    })
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    let real = real_of(file);
    methods(real).xSectorSize.map_or(4096, |f| f(real))
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    let real = real_of(file);
    methods(real).xDeviceCharacteristics.map_or(0, |f| f(real))
}

/// Version 1: a WAL file has no shared memory and is never memory-mapped.
static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::sql_types::BigInt;
    use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    fn count(conn: &mut SqliteConnection) -> i64 {
        diesel::sql_query("SELECT count(*) AS n FROM t")
            .get_result::<Count>(conn)
            .expect("count")
            .n
    }

    #[test]
    fn commits_through_the_vfs_are_whole_for_other_connections_and_written_once() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("a?b#c%d.db");
        let path = path.to_str().expect("utf-8");
        let uri = uri(path).expect("registered");
        let mut writer = SqliteConnection::establish(&uri).expect("open through the vfs");
        writer
            .batch_execute(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                 CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL);",
            )
            .expect("schema");
        writer.batch_execute(PRAGMAS).expect("schema");
        // A reader through the default VFS, on the same file.
        let mut reader = SqliteConnection::establish(path).expect("open plainly");
        for round in 1..=20i64 {
            let (asked, written) = (
                WAL_WRITES_ASKED.load(Ordering::Relaxed),
                WAL_WRITES.load(Ordering::Relaxed),
            );
            writer
                .batch_execute(
                    "BEGIN IMMEDIATE; INSERT INTO t (v) SELECT printf('%.2000c', 'x') \
                     FROM (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4); \
                     COMMIT;",
                )
                .expect("commit");
            assert_eq!(
                count(&mut reader),
                round * 4,
                "every commit whole for the reader"
            );
            let asked = WAL_WRITES_ASKED.load(Ordering::Relaxed) - asked;
            let written = WAL_WRITES.load(Ordering::Relaxed) - written;
            // Tests in other threads may write too: this commit's frames at least were
            // asked for as two writes each, and went out in fewer.
            assert!(asked >= 4, "frames written: {asked}");
            assert!(
                written < asked,
                "{written} pwrites for {asked} writes asked"
            );
        }
        // A commit of ~100 frames (400 KiB): written in runs under the unix VFS's 128 KiB.
        writer
            .batch_execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)                  INSERT INTO t (v) SELECT printf('%.2000c', 'y') FROM n;",
            )
            .expect("a large commit");
        assert_eq!(count(&mut reader), 280);
        drop(writer);
        let mut again = SqliteConnection::establish(&uri).expect("reopen");
        assert_eq!(
            count(&mut again),
            280,
            "what was committed is there after a reopen"
        );
    }
}
