//! Chunks, patches, chunk indexes and release manifests in S3-compatible
//! object storage (`[artifacts] backend = "s3"`), through the `object_store`
//! crate: the same [`ArtifactStore`] semantics as the local directory, so
//! [`crate::chunks`] checks, caches and quarantines them the same way.
//!
//! Layout under the bucket and the configured prefix:
//!
//! ```text
//! PREFIX/chunks/ab/<sha256>.zst          a chunk, named by its content
//! PREFIX/patches/ab/<sha256>.zst         a patch
//! PREFIX/indexes/ab/<sha256>.zst         a release's binary chunk index
//! PREFIX/chunks/damaged/<sha256>.zst.<ns>  a damaged copy, set aside
//! PREFIX/releases/<version>/manifest.json  the signed manifest
//! PREFIX/releases/<version>/chunk-index    its chunk index, if it has one
//! ```
//!
//! An object's fingerprint is its size, last-modified time and a digest of
//! its ETag: a rewrite changes the ETag (or at least the time), so a check
//! made before no longer holds. Object stores have no rename; quarantine
//! copies the object aside and deletes it, after checking it is still the
//! one that was read (a repair landing between that check and the delete
//! is deleted too and counts as missing: the next upload stores it again).

use crate::artifacts::{ArtifactError, ArtifactStore, Fingerprint};
use crate::config::ArtifactsConfig;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::BodyExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::path::Path;
use object_store::signer::Signer as _;
use object_store::ObjectStoreExt as _;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use uplift_proto::{ChunkHash, Version};

/// object_store's HTTP transport: the server's own reqwest (0.12, rustls
/// with ring, the system's trust store), one HTTP stack for webhooks and
/// the bucket alike.
#[derive(Debug)]
struct Connector {
    allow_http: bool,
    /// One request, start to end of its body.
    timeout: Duration,
}

impl HttpConnector for Connector {
    fn connect(&self, _options: &object_store::ClientOptions) -> object_store::Result<HttpClient> {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(!self.allow_http)
            .connect_timeout(Duration::from_secs(5).min(self.timeout))
            .timeout(self.timeout)
            // A presigned or signed request is for one URL: never followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(Transport(client)))
    }
}

#[derive(Debug)]
struct Transport(reqwest::Client);

#[async_trait]
impl HttpService for Transport {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = request.into_parts();
        let url = reqwest::Url::parse(&parts.uri.to_string())
            .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        // Bodies are in memory already (one chunk, one manifest); whole,
        // they go out with a Content-Length, which S3 wants on a PUT.
        let body = body.collect().await?.to_bytes();
        let mut outgoing = reqwest::Request::new(parts.method, url);
        *outgoing.headers_mut() = parts.headers;
        *outgoing.body_mut() = Some(reqwest::Body::from(body));
        let response = self.0.execute(outgoing).await.map_err(http_error)?;
        let (parts, body) = http::Response::<reqwest::Body>::from(response).into_parts();
        Ok(HttpResponse::from_parts(
            parts,
            HttpResponseBody::new(body.map_err(http_error)),
        ))
    }
}

/// How object_store treats a failure (which kinds it retries).
fn http_error(e: reqwest::Error) -> HttpError {
    let kind = if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_connect() {
        HttpErrorKind::Connect
    } else if e.is_body() || e.is_request() {
        HttpErrorKind::Request
    } else if e.is_decode() {
        HttpErrorKind::Decode
    } else {
        HttpErrorKind::Unknown
    };
    HttpError::new(kind, e)
}

/// Chunks read from the store at once for one span.
const READ_CONCURRENCY: usize = 8;

/// One bucket (and prefix) as configured, shared by the stores of each kind.
#[derive(Debug)]
pub struct Bucket {
    s3: AmazonS3,
    /// Where the bucket is, for messages (never the credentials).
    place: String,
    prefix: Path,
    /// How long presigned URLs stay valid, when devices download from the
    /// store directly.
    presign: Option<Duration>,
}

impl Bucket {
    /// The bucket `config` names; credentials from the config, else from
    /// the usual `AWS_*` environment variables.
    pub fn open(config: &ArtifactsConfig) -> Result<Arc<Self>, ArtifactError> {
        let bucket = config.bucket.clone().unwrap_or_default();
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_region(&config.region)
            .with_allow_http(config.allow_http)
            // Bounded: a store that is down fails a device's request within
            // seconds (the device retries), not after minutes of backoff.
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                },
                max_retries: 2,
                retry_timeout: Duration::from_secs(config.request_timeout_secs),
            })
            .with_http_connector(Connector {
                allow_http: config.allow_http,
                timeout: Duration::from_secs(config.request_timeout_secs),
            });
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(key) = &config.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let place = format!(
            "bucket {bucket} at {}",
            config.endpoint.as_deref().unwrap_or("AWS S3")
        );
        let s3 = builder.build().map_err(|source| ArtifactError::Object {
            op: "configure",
            key: place.clone(),
            source,
        })?;
        Ok(Arc::new(Self {
            s3,
            place,
            prefix: Path::from(config.prefix.trim_matches('/')),
            presign: config
                .direct_downloads
                .then(|| Duration::from_secs(config.presign_secs)),
        }))
    }

    fn key(&self, parts: &[&str]) -> Path {
        let mut path = self.prefix.clone();
        for part in parts {
            path = path.join(*part);
        }
        path
    }

    fn failed(
        &self,
        op: &'static str,
        key: &Path,
    ) -> impl FnOnce(object_store::Error) -> ArtifactError {
        let key = format!("{key} in {}", self.place);
        move |source| ArtifactError::Object { op, key, source }
    }

    /// The store of one kind of object, under `PREFIX/<dir>/`.
    pub fn store(self: &Arc<Self>, dir: &'static str) -> S3Artifacts {
        S3Artifacts {
            bucket: self.clone(),
            dir,
        }
    }
}

/// The chunks (or patches, or indexes) under one directory of a bucket.
#[derive(Debug, Clone)]
pub struct S3Artifacts {
    bucket: Arc<Bucket>,
    dir: &'static str,
}

impl S3Artifacts {
    fn key_of(&self, hash: &ChunkHash) -> Path {
        let hex = hash.to_hex();
        self.bucket
            .key(&[self.dir, &hex[..2], &format!("{hex}.zst")])
    }

    /// The whole object within `limit` + 1 bytes, and its fingerprint.
    async fn read(
        &self,
        hash: &ChunkHash,
        limit: u64,
    ) -> Result<Option<(Bytes, Fingerprint)>, ArtifactError> {
        let key = self.key_of(hash);
        let got = match self.bucket.s3.get(&key).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.bucket.failed("GET", &key)(e)),
        };
        let fingerprint = fingerprint(&got.meta);
        let mut body = Vec::with_capacity(got.meta.size.min(limit + 1) as usize);
        let mut stream = got.into_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(self.bucket.failed("GET", &key))?;
            let room = (limit + 1 - body.len() as u64) as usize;
            body.extend_from_slice(&piece[..piece.len().min(room)]);
            if body.len() as u64 > limit {
                // Longer than any object of this kind: damaged; the rest
                // is not worth fetching.
                break;
            }
        }
        Ok(Some((Bytes::from(body), fingerprint)))
    }
}

fn fingerprint(meta: &object_store::ObjectMeta) -> Fingerprint {
    let identity = meta.e_tag.as_deref().map_or(0, |tag| {
        let digest = Sha256::digest(tag.as_bytes());
        u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
    });
    Fingerprint {
        len: meta.size,
        modified_ns: i128::from(meta.last_modified.timestamp_nanos_opt().unwrap_or(0)),
        identity,
    }
}

#[async_trait]
impl ArtifactStore for S3Artifacts {
    async fn put(&self, hash: &ChunkHash, stored: Bytes) -> Result<(), ArtifactError> {
        // One PUT: S3 makes an object visible whole or not at all.
        let key = self.key_of(hash);
        self.bucket
            .s3
            .put(&key, stored.into())
            .await
            .map(drop)
            .map_err(self.bucket.failed("PUT", &key))
    }

    async fn read_all(
        &self,
        hash: &ChunkHash,
        limit: u64,
    ) -> Result<Option<(Bytes, Fingerprint)>, ArtifactError> {
        self.read(hash, limit).await
    }

    async fn read_many(
        &self,
        hashes: &[ChunkHash],
        limit: u64,
    ) -> Vec<Result<Option<(Bytes, Fingerprint)>, ArtifactError>> {
        let this = self.clone();
        futures_util::stream::iter(hashes.to_vec())
            .map(move |hash| {
                let this = this.clone();
                async move { this.read(&hash, limit).await }
            })
            .buffered(READ_CONCURRENCY)
            .collect()
            .await
    }

    async fn current(&self, hash: &ChunkHash) -> Result<Option<Fingerprint>, ArtifactError> {
        let key = self.key_of(hash);
        match self.bucket.s3.head(&key).await {
            Ok(meta) => Ok(Some(fingerprint(&meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.bucket.failed("HEAD", &key)(e)),
        }
    }

    async fn quarantine(
        &self,
        hash: &ChunkHash,
        read: &Fingerprint,
    ) -> Result<bool, ArtifactError> {
        if self.current(hash).await? != Some(*read) {
            return Ok(false);
        }
        let key = self.key_of(hash);
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let aside = self.bucket.key(&[
            self.dir,
            "damaged",
            &format!("{}.zst.{stamp}", hash.to_hex()),
        ]);
        self.bucket
            .s3
            .copy(&key, &aside)
            .await
            .map_err(self.bucket.failed("COPY", &key))?;
        match self.bucket.s3.delete(&key).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.bucket.failed("DELETE", &key)(e)),
        }
    }

    async fn direct_url(&self, hash: &ChunkHash) -> Result<Option<url::Url>, ArtifactError> {
        let Some(lifetime) = self.bucket.presign else {
            return Ok(None);
        };
        let key = self.key_of(hash);
        // Signed locally with the configured credentials: no request to the store.
        self.bucket
            .s3
            .signed_url(object_store::signer::Method::GET, &key, lifetime)
            .await
            .map(Some)
            .map_err(self.bucket.failed("presign GET", &key))
    }

    async fn publish_release(
        &self,
        version: &Version,
        manifest_json: Bytes,
        index: Option<Bytes>,
    ) -> Result<(), ArtifactError> {
        let version = version.to_string();
        let mut objects = vec![("manifest.json", manifest_json)];
        objects.extend(index.map(|index| ("chunk-index", index)));
        for (name, bytes) in objects {
            let key = self.bucket.key(&["releases", &version, name]);
            self.bucket
                .s3
                .put(&key, bytes.into())
                .await
                .map_err(self.bucket.failed("PUT", &key))?;
        }
        Ok(())
    }
}
