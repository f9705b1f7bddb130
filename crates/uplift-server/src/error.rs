//! The server's error type for HTTP handlers, and the one place that maps a
//! stable error kind to an HTTP status.

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use uplift_proto::{ErrorKind, WireError};

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthorized, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

impl From<uplift_release::ReleaseError> for ApiError {
    fn from(e: uplift_release::ReleaseError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

impl From<crate::chunks::ChunkError> for ApiError {
    fn from(e: crate::chunks::ChunkError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

impl From<crate::chunks::LoadError> for ApiError {
    fn from(e: crate::chunks::LoadError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

impl From<crate::artifacts::ArtifactError> for ApiError {
    fn from(e: crate::artifacts::ArtifactError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

impl ApiError {
    /// One of axum's own extractor rejections, in our JSON shape. Its status
    /// says whose fault it is; the kind follows from that.
    fn rejected(status: StatusCode, message: String) -> Self {
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorKind::PayloadTooLarge
        } else if status == StatusCode::UPGRADE_REQUIRED {
            ErrorKind::UnsupportedProtocol
        } else if status.is_server_error() {
            ErrorKind::Internal
        } else {
            ErrorKind::BadRequest
        };
        ApiError::new(kind, message)
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::rejected(
            r.status(),
            format!(
                "URL path refused: {}; names in paths are ASCII (hex chunk digests, versions, numbers)",
                r.body_text()
            ),
        )
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "request body refused: {}; it is larger than any chunk or manifest the server accepts",
                r.body_text()
            )
        } else {
            format!("request body refused: {}", r.body_text())
        };
        ApiError::rejected(status, message)
    }
}

impl From<WebSocketUpgradeRejection> for ApiError {
    fn from(r: WebSocketUpgradeRejection) -> Self {
        ApiError::rejected(
            r.status(),
            format!(
                "the device channel is a WebSocket and this request is not a WebSocket upgrade: {}",
                r.body_text()
            ),
        )
    }
}

/// Every kind has its status spelled out: adding a kind forces a decision here.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest
        | ErrorKind::MalformedFrame
        | ErrorKind::UnexpectedMessage
        | ErrorKind::ManifestInvalid
        | ErrorKind::ManifestExpired
        | ErrorKind::VersionMismatch
        | ErrorKind::WrongDeviceType => StatusCode::BAD_REQUEST,
        ErrorKind::ChunkHashMismatch
        | ErrorKind::ImageHashMismatch
        | ErrorKind::ManifestSignature => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::FrameTooLarge | ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::UnsupportedProtocol => StatusCode::UPGRADE_REQUIRED,
        ErrorKind::NotFound | ErrorKind::UnknownDevice => StatusCode::NOT_FOUND,
        ErrorKind::Conflict | ErrorKind::DowngradeRefused => StatusCode::CONFLICT,
        ErrorKind::Unauthorized | ErrorKind::BadDeviceSignature => StatusCode::UNAUTHORIZED,
        ErrorKind::EnrollmentRefused => StatusCode::FORBIDDEN,
        ErrorKind::ServerBusy => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::DownloadFailed
        | ErrorKind::ServerUnreachable
        | ErrorKind::SlotTooSmall
        | ErrorKind::BootEnv
        | ErrorKind::HealthCheckFailed
        | ErrorKind::RolledBack
        | ErrorKind::HookFailed
        | ErrorKind::SlotIo
        | ErrorKind::Storage
        | ErrorKind::StoredChunkDamaged
        | ErrorKind::Internal
        | ErrorKind::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_for(self.kind);
        if status.is_server_error() {
            tracing::error!(kind = %self.kind, "{}", self.message);
        }
        (status, Json(WireError::new(self.kind, self.message))).into_response()
    }
}
