//! The server's error type for HTTP handlers, and the one place that maps a
//! stable error kind to an HTTP status.

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use uplift_proto::{ErrorKind, WireError};

/// An answer's error: what the client is told (`kind` and `message`), and
/// the error it came from, which only the server's log sees.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }
    /// An answer that says what `error` says, keeping `error` for the log.
    pub fn from_error(
        kind: ErrorKind,
        error: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind,
            message: error.to_string(),
            source: Some(Box::new(error)),
        }
    }
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
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
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The causes below the message, for the log. A wrapper often says just
    /// what it wraps (the message is usually the source's own text), so a
    /// link that repeats the one above it is left out.
    pub fn causes(&self) -> Vec<String> {
        let mut causes: Vec<String> = Vec::new();
        let mut next = self
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(error) = next {
            let text = error.to_string();
            if causes.last().unwrap_or(&self.message) != &text {
                causes.push(text);
            }
            next = error.source();
        }
        causes
    }
}

impl From<crate::service::ServiceError> for ApiError {
    fn from(e: crate::service::ServiceError) -> Self {
        ApiError::from_error(e.kind(), e)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from_error(e.kind(), e)
    }
}

impl From<uplift_release::ReleaseError> for ApiError {
    fn from(e: uplift_release::ReleaseError) -> Self {
        ApiError::from_error(e.kind(), e)
    }
}

impl From<crate::chunks::ChunkError> for ApiError {
    fn from(e: crate::chunks::ChunkError) -> Self {
        ApiError::from_error(e.kind(), e)
    }
}

impl From<crate::chunks::LoadError> for ApiError {
    fn from(e: crate::chunks::LoadError) -> Self {
        ApiError::from_error(e.kind(), e)
    }
}

impl From<crate::download_token::TokenError> for ApiError {
    fn from(e: crate::download_token::TokenError) -> Self {
        ApiError::from_error(e.kind(), e)
    }
}

impl From<crate::artifacts::ArtifactError> for ApiError {
    fn from(e: crate::artifacts::ArtifactError) -> Self {
        ApiError::from_error(e.kind(), e)
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
        .with_source(r)
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
        ApiError::rejected(status, message).with_source(r)
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
        .with_source(r)
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
        | ErrorKind::RootInvalid
        | ErrorKind::RootExpired
        | ErrorKind::FreshnessInvalid
        | ErrorKind::FreshnessExpired
        | ErrorKind::FreshnessReplayed
        | ErrorKind::VersionMismatch
        | ErrorKind::WrongDeviceType => StatusCode::BAD_REQUEST,
        ErrorKind::ChunkHashMismatch
        | ErrorKind::ImageHashMismatch
        | ErrorKind::ManifestSignature
        | ErrorKind::RootSignature => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::FrameTooLarge | ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::UnsupportedProtocol => StatusCode::UPGRADE_REQUIRED,
        ErrorKind::NotFound | ErrorKind::UnknownDevice => StatusCode::NOT_FOUND,
        ErrorKind::Conflict | ErrorKind::DowngradeRefused | ErrorKind::DowngradeNotSigned => {
            StatusCode::CONFLICT
        }
        ErrorKind::Unauthorized
        | ErrorKind::BadDeviceSignature
        | ErrorKind::DeviceRemoved
        | ErrorKind::DownloadTokenInvalid
        | ErrorKind::DownloadTokenExpired => StatusCode::UNAUTHORIZED,
        ErrorKind::EnrollmentRefused | ErrorKind::EnrollmentRejected | ErrorKind::Forbidden => {
            StatusCode::FORBIDDEN
        }
        ErrorKind::ServerBusy | ErrorKind::ObjectStoreUnavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorKind::WebhookFailed => StatusCode::BAD_GATEWAY,
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
            let causes = self.causes();
            if causes.is_empty() {
                tracing::error!(kind = %self.kind, "{}", self.message);
            } else {
                tracing::error!(kind = %self.kind, caused_by = %causes.join(": "), "{}", self.message);
            }
        }
        (status, Json(WireError::new(self.kind, self.message))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[tokio::test]
    async fn the_answer_says_what_failed_and_the_log_keeps_why() {
        let io = std::io::Error::other("disk on fire");
        let store = StoreError::Database {
            action: "listing devices",
            source: sqlx::Error::Io(io),
        };
        let wire = store.to_string();
        let error = ApiError::from(crate::service::ServiceError::from(store));
        assert_eq!(error.kind, ErrorKind::Storage);
        assert_eq!(error.message, wire);
        // The service error and the store error say the same; sqlx's own
        // words, then the I/O error's, are what the log adds.
        let causes = error.causes();
        assert_eq!(
            causes.last().map(String::as_str),
            Some("disk on fire"),
            "{causes:?}"
        );
        assert!(!causes.contains(&wire), "{causes:?}");
        assert!(std::error::Error::source(&error).is_some());

        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"kind": "storage", "message": wire})
        );
    }
}
