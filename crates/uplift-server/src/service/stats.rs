//! The server's counters: fleet size, traffic sent, and the work queued in
//! memory.

use super::ServiceResult;
use crate::budget;
use crate::state::AppState;
use std::sync::atomic::Ordering::Relaxed;
use uplift_proto::api::ServerStats;

pub async fn get(state: &AppState) -> ServiceResult<ServerStats> {
    Ok(ServerStats {
        devices_total: state.store.count_devices().await?,
        devices_online: state.hub.online_count() as u64,
        bytes_sent: state.stats.bytes_sent.load(Relaxed),
        chunks_sent: state.stats.chunks_sent.load(Relaxed),
        reports_applied: state.stats.reports_applied.load(Relaxed),
        reports_stale: state.stats.reports_stale.load(Relaxed),
        device_rows_written: state.stats.device_rows_written.load(Relaxed),
        write_batches: state.stats.write_batches.load(Relaxed),
        device_rows_pending: state.live.pending_writes() as u64,
        downloads_in_flight: state.budgets.in_use(budget::Kind::Download) as u64,
    })
}
