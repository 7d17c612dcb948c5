//! Version retention (SPEC §7 `versioned_messages.retention_window_seconds`): a periodic
//! pass purges versions older than the window, in batches through the one writer, never
//! the newest version of a message, so the latest state always stays readable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::ApiResult;
use crate::persistence::{Persistence, Write};
use crate::settings::WorkspaceSettings;
use crate::store::{queries, DbPool};

/// One pass over every workspace with a retention window; returns versions purged.
pub async fn purge_pass(pool: &DbPool, persistence: &Persistence) -> ApiResult<usize> {
    let workspaces = {
        let conn_pool = pool.clone();
        pool.run_blocking(move || -> ApiResult<Vec<(String, String)>> {
            Ok(queries::workspace_settings_all(&mut *conn_pool.get()?)?)
        })
        .await
        .map_err(crate::error::ApiError::internal)??
    };
    let mut total = 0;
    for (id, raw) in workspaces {
        let limits = WorkspaceSettings::from_stored(&raw).versioned_messages;
        if limits.retention_window_seconds == 0 {
            continue;
        }
        let window =
            chrono::Duration::seconds(limits.retention_window_seconds.min(i64::MAX as u64) as i64);
        let cutoff = crate::ids::to_rfc3339(chrono::Utc::now() - window);
        let batch = limits.purge_batch_size.max(1) as i64;
        loop {
            let purged = Arc::new(AtomicUsize::new(0));
            let (counter, ws, cut) = (purged.clone(), id.clone(), cutoff.clone());
            persistence
                .write(Write {
                    workspace_id: id.clone(),
                    channel_seqs: None,
                    apply: Box::new(move |conn| {
                        let n = queries::purge_versions(conn, &ws, &cut, batch)?;
                        counter.store(n, Ordering::Relaxed);
                        Ok(n > 0)
                    }),
                    events: Vec::new(),
                    version: None,
                    savepoint: true,
                })
                .await?;
            let n = purged.load(Ordering::Relaxed);
            total += n;
            if (n as i64) < batch {
                break;
            }
        }
    }
    Ok(total)
}

/// Runs [`purge_pass`] every `interval` for the life of the system.
pub fn spawn_purger(pool: DbPool, persistence: Persistence, interval: Duration) {
    actix_web::rt::spawn(async move {
        let mut tick = actix_web::rt::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            match purge_pass(&pool, &persistence).await {
                Ok(0) => {}
                Ok(n) => log::info!("retention: purged {n} old message versions"),
                Err(e) => log::warn!("retention pass failed: {e}"),
            }
        }
    });
}
