//! Budgets by kind, so device channels, downloads and admin requests never
//! starve one another: a channel holds a channel slot for its whole life
//! (not the slot of the HTTP connection it was upgraded from), downloads
//! and admin calls each have their own cap on requests in flight. A request
//! that finds its budget spent waits a little, then gets `server_busy` (503),
//! which agents retry and operators see with the reason.

use crate::config::Limits;
use crate::error::ApiError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uplift_proto::ErrorKind;

/// How long a download or admin request may queue for its budget.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    DeviceChannel,
    Download,
    Admin,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::DeviceChannel => "device channels",
            Kind::Download => "downloads in flight",
            Kind::Admin => "admin requests in flight",
        }
    }
    fn setting(self) -> &'static str {
        match self {
            Kind::DeviceChannel => "max_device_channels",
            Kind::Download => "max_download_requests",
            Kind::Admin => "max_admin_requests",
        }
    }
}

#[derive(Debug)]
pub struct Budgets {
    channels: Arc<Semaphore>,
    downloads: Arc<Semaphore>,
    admin: Arc<Semaphore>,
    sizes: [usize; 3],
    queue_wait: Duration,
}

impl Budgets {
    pub fn new(limits: &Limits) -> Self {
        Self {
            channels: Arc::new(Semaphore::new(limits.max_device_channels)),
            downloads: Arc::new(Semaphore::new(limits.max_download_requests)),
            admin: Arc::new(Semaphore::new(limits.max_admin_requests)),
            sizes: [
                limits.max_device_channels,
                limits.max_download_requests,
                limits.max_admin_requests,
            ],
            queue_wait: QUEUE_WAIT,
        }
    }

    fn of(&self, kind: Kind) -> (&Arc<Semaphore>, usize) {
        match kind {
            Kind::DeviceChannel => (&self.channels, self.sizes[0]),
            Kind::Download => (&self.downloads, self.sizes[1]),
            Kind::Admin => (&self.admin, self.sizes[2]),
        }
    }

    fn busy(kind: Kind, size: usize) -> ApiError {
        ApiError::new(
            ErrorKind::ServerBusy,
            format!(
                "the server is at its limit of {size} {} ([limits] {}); try again shortly",
                kind.name(),
                kind.setting()
            ),
        )
    }

    /// A slot now, or `server_busy`: a device channel does not queue (its
    /// agent reconnects with backoff).
    pub fn try_take(&self, kind: Kind) -> Result<OwnedSemaphorePermit, ApiError> {
        let (semaphore, size) = self.of(kind);
        semaphore
            .clone()
            .try_acquire_owned()
            .map_err(|_| Self::busy(kind, size))
    }

    /// A slot within [`QUEUE_WAIT`], or `server_busy`.
    pub async fn take(&self, kind: Kind) -> Result<OwnedSemaphorePermit, ApiError> {
        let (semaphore, size) = self.of(kind);
        match tokio::time::timeout(self.queue_wait, semaphore.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => Err(Self::busy(kind, size)),
        }
    }

    /// Slots of `kind` in use now.
    pub fn in_use(&self, kind: Kind) -> usize {
        let (semaphore, size) = self.of(kind);
        size - semaphore.available_permits()
    }

    /// Waits (up to `limit`) until no device channel is open.
    pub async fn channels_closed(&self, limit: Duration) {
        let all = u32::try_from(self.sizes[0]).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(limit, self.channels.acquire_many(all)).await;
    }
}

/// Middleware: holds a slot of `kind` until the response body is sent.
async fn limited(budgets: &Budgets, kind: Kind, request: Request, next: Next) -> Response {
    let permit = match budgets.take(kind).await {
        Ok(permit) => permit,
        Err(e) => return e.into_response(),
    };
    let (parts, body) = next.run(request).await.into_parts();
    // The slot goes when the body has been sent (or the client went away).
    let body = Body::from_stream(body.into_data_stream().map(move |piece| {
        let _held = &permit;
        piece
    }));
    Response::from_parts(parts, body)
}

pub async fn limit_downloads(
    State(state): State<Arc<crate::state::AppState>>,
    request: Request,
    next: Next,
) -> Response {
    limited(&state.budgets, Kind::Download, request, next).await
}

pub async fn limit_admin(
    State(state): State<Arc<crate::state::AppState>>,
    request: Request,
    next: Next,
) -> Response {
    limited(&state.budgets, Kind::Admin, request, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(channels: usize) -> Limits {
        Limits {
            max_device_channels: channels,
            max_download_requests: 1,
            max_admin_requests: 1,
            ..Limits::default()
        }
    }

    #[tokio::test]
    async fn a_full_channel_budget_leaves_downloads_and_admin_alone() {
        let budgets = Budgets::new(&limits(2));
        let _a = budgets.try_take(Kind::DeviceChannel).unwrap();
        let _b = budgets.try_take(Kind::DeviceChannel).unwrap();
        let refused = budgets.try_take(Kind::DeviceChannel).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::ServerBusy);
        assert!(refused.message.contains("max_device_channels"), "{refused}");
        assert!(budgets.take(Kind::Download).await.is_ok());
        assert!(budgets.take(Kind::Admin).await.is_ok());
        assert_eq!(budgets.in_use(Kind::DeviceChannel), 2);
    }

    #[tokio::test]
    async fn a_request_queues_for_its_budget_then_is_told_the_server_is_busy() {
        let budgets = Arc::new(Budgets {
            queue_wait: Duration::from_millis(300),
            ..Budgets::new(&limits(1))
        });
        let held = budgets.take(Kind::Download).await.unwrap();
        let waiting = {
            let budgets = budgets.clone();
            tokio::spawn(async move { budgets.take(Kind::Download).await.map(drop) })
        };
        tokio::time::sleep(budgets.queue_wait / 2).await;
        drop(held);
        assert!(
            waiting.await.unwrap().is_ok(),
            "a freed slot goes to the queued request"
        );
        let _held = budgets.take(Kind::Download).await.unwrap();
        let err = budgets.take(Kind::Download).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::ServerBusy);
        assert!(err.message.contains("max_download_requests"), "{err}");
    }
}
