//! Client for the server's admin REST API, used by every CLI command, the
//! fleet harness and demo (`uplift-fleet`) and the end-to-end tests, so all
//! of them see what an operator sees. A crate of its own so the CLI and the
//! harness can both use it without one depending on the other.

use anyhow::Context;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use std::path::Path;
use std::time::Duration;
use uplift_proto::api::*;
use uplift_proto::auth::{
    AuditPage, AuditQuery, Caller, TokenCreate, TokenCreated, TokenView, AUDIT_PATH, TOKENS_PATH,
    WHOAMI_PATH,
};
use uplift_proto::events::{
    DeliveryView, EventStreamQuery, WebhookCreate, WebhookCreated, WebhookView, EVENTS_PATH,
    WEBHOOKS_PATH,
};
use uplift_proto::{ChunkHash, DeviceId, WireError};
use uplift_release::build::ReleaseDir;

#[derive(Debug, Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    /// For the event stream: no deadline on the whole answer, which lasts
    /// as long as one listens; the server's keep-alive comments every 15 s
    /// keep the read deadline from expiring on a quiet fleet.
    streaming: reqwest::Client,
    base: reqwest::Url,
    token: String,
}

/// Chunks uploaded at once: enough to hide latency, few enough to be polite.
const UPLOAD_CONCURRENCY: usize = 4;

impl AdminClient {
    pub fn new(server_url: &str, ca_file: &Path, token: &str) -> anyhow::Result<Self> {
        let base: reqwest::Url = server_url
            .parse()
            .with_context(|| format!("server URL {server_url:?} is not a URL"))?;
        let pem = std::fs::read(ca_file)
            .with_context(|| format!("reading server CA {}", ca_file.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("parsing server CA {}", ca_file.display()))?;
        let builder = || {
            reqwest::Client::builder()
                .use_rustls_tls()
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca.clone())
                .connect_timeout(Duration::from_secs(10))
        };
        let http = builder()
            .timeout(Duration::from_secs(120))
            .build()
            .context("building HTTPS client")?;
        let streaming = builder()
            .read_timeout(Duration::from_secs(60))
            .build()
            .context("building HTTPS client")?;
        Ok(Self {
            http,
            streaming,
            base,
            token: token.trim().to_owned(),
        })
    }

    fn url(&self, path: &str) -> anyhow::Result<reqwest::Url> {
        self.base
            .join(path)
            .with_context(|| format!("bad API path {path}"))
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the server at {}: {e}; is uplift-server running there?",
                self.base
            )
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .context("reading the server's answer")?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .with_context(|| format!("unexpected answer from the server ({status})"));
        }
        match serde_json::from_slice::<WireError>(&body) {
            Ok(err) => Err(anyhow::Error::new(err).context(format!("server refused ({status})"))),
            Err(_) => anyhow::bail!(
                "server answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    /// The Prometheus exposition, as a scraper would get it.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let response = self
            .http
            .get(self.url(METRICS_PATH)?)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = response.status();
        let text = response.text().await.context("reading the metrics")?;
        if !status.is_success() {
            anyhow::bail!("server answered {status}: {text}");
        }
        Ok(text)
    }

    /// One page of devices passing `query`'s filters.
    pub async fn devices_page(&self, query: &DeviceQuery) -> anyhow::Result<DevicePage> {
        self.send(self.http.get(self.url(DEVICES_PATH)?).query(query))
            .await
    }

    /// Every device passing `query`'s filters, page after page from
    /// `query.after` (largest pages unless `query.limit` says otherwise).
    pub async fn devices_where(&self, query: &DeviceQuery) -> anyhow::Result<Vec<DeviceView>> {
        let mut query = DeviceQuery {
            limit: Some(query.limit.unwrap_or(MAX_PAGE_LIMIT)),
            ..query.clone()
        };
        let mut devices = Vec::new();
        loop {
            let page = self.devices_page(&query).await?;
            devices.extend(page.devices);
            match page.next {
                Some(next) => query.after = Some(next),
                None => return Ok(devices),
            }
        }
    }

    /// Every enrolled device, by ID.
    pub async fn devices(&self) -> anyhow::Result<Vec<DeviceView>> {
        self.devices_where(&DeviceQuery::default()).await
    }

    pub async fn device(&self, id: &DeviceId) -> anyhow::Result<DeviceView> {
        self.send(self.http.get(self.url(&device_path(id))?)).await
    }

    /// Removes (decommissions) a device; the device as it is now.
    pub async fn remove_device(&self, id: &DeviceId) -> anyhow::Result<DeviceView> {
        self.send(self.http.delete(self.url(&device_path(id))?))
            .await
    }

    /// Enrollment requests (approval mode), only those in `state` if given.
    pub async fn enrollments(
        &self,
        state: Option<uplift_proto::enrollment::EnrollmentState>,
    ) -> anyhow::Result<Vec<uplift_proto::enrollment::EnrollmentRequestView>> {
        let mut request = self
            .http
            .get(self.url(uplift_proto::enrollment::ENROLLMENTS_PATH)?);
        if let Some(state) = state {
            request = request.query(&[("state", state.as_str())]);
        }
        self.send(request).await
    }

    pub async fn accept_enrollment(
        &self,
        id: i64,
    ) -> anyhow::Result<uplift_proto::enrollment::EnrollmentRequestView> {
        let path = format!("{}/{id}/accept", uplift_proto::enrollment::ENROLLMENTS_PATH);
        self.send(self.http.post(self.url(&path)?)).await
    }

    pub async fn reject_enrollment(
        &self,
        id: i64,
        reason: Option<String>,
    ) -> anyhow::Result<uplift_proto::enrollment::EnrollmentRequestView> {
        let path = format!("{}/{id}/reject", uplift_proto::enrollment::ENROLLMENTS_PATH);
        let body = uplift_proto::enrollment::EnrollmentRejection { reason };
        self.send(self.http.post(self.url(&path)?).json(&body))
            .await
    }

    pub async fn tag_device(
        &self,
        id: &DeviceId,
        change: &TagChange,
    ) -> anyhow::Result<DeviceView> {
        self.send(self.http.put(self.url(&device_tags_path(id))?).json(change))
            .await
    }

    /// One page of a device's history, newest first.
    pub async fn device_history(
        &self,
        id: &DeviceId,
        query: &HistoryQuery,
    ) -> anyhow::Result<DeviceHistory> {
        self.send(
            self.http
                .get(self.url(&device_history_path(id))?)
                .query(query),
        )
        .await
    }

    pub async fn releases(&self) -> anyhow::Result<Vec<ReleaseView>> {
        self.send(self.http.get(self.url(RELEASES_PATH)?)).await
    }

    pub async fn rollouts(&self) -> anyhow::Result<Vec<RolloutView>> {
        self.send(self.http.get(self.url(ROLLOUTS_PATH)?)).await
    }

    pub async fn rollout(&self, id: i64) -> anyhow::Result<RolloutView> {
        self.send(self.http.get(self.url(&format!("{ROLLOUTS_PATH}/{id}"))?))
            .await
    }

    /// Rollout `id`'s devices, with their phase and how far each got,
    /// every page of them.
    pub async fn rollout_members(&self, id: i64) -> anyhow::Result<Vec<RolloutMember>> {
        let mut members = Vec::new();
        let mut query = RolloutMemberQuery {
            limit: Some(MAX_PAGE_LIMIT),
            ..RolloutMemberQuery::default()
        };
        loop {
            let page: RolloutMemberPage = self
                .send(
                    self.http
                        .get(self.url(&format!("{ROLLOUTS_PATH}/{id}/devices"))?)
                        .query(&query),
                )
                .await?;
            members.extend(page.devices);
            match page.next {
                Some(next) => query.after = Some(next),
                None => return Ok(members),
            }
        }
    }

    pub async fn command_rollout(
        &self,
        id: i64,
        command: RolloutCommandName,
    ) -> anyhow::Result<RolloutView> {
        let name = match command {
            RolloutCommandName::Pause => "pause",
            RolloutCommandName::Resume => "resume",
            RolloutCommandName::Approve => "approve",
            RolloutCommandName::Abort => "abort",
            RolloutCommandName::Retry => "retry",
        };
        self.send(
            self.http
                .post(self.url(&format!("{ROLLOUTS_PATH}/{id}/{name}"))?),
        )
        .await
    }

    pub async fn start_rollout(&self, request: &RolloutCreate) -> anyhow::Result<RolloutView> {
        self.send(self.http.post(self.url(ROLLOUTS_PATH)?).json(request))
            .await
    }

    /// What [`AdminClient::start_rollout`] would start, without starting it.
    pub async fn preview_rollout(&self, request: &RolloutCreate) -> anyhow::Result<RolloutPreview> {
        self.send(
            self.http
                .post(self.url(ROLLOUT_PREVIEW_PATH)?)
                .json(request),
        )
        .await
    }

    /// The fleet at a glance: devices by version, state and type.
    pub async fn fleet(&self) -> anyhow::Result<FleetSummary> {
        self.send(self.http.get(self.url(FLEET_PATH)?)).await
    }

    pub async fn stats(&self) -> anyhow::Result<ServerStats> {
        self.send(self.http.get(self.url(STATS_PATH)?)).await
    }

    /// Who the server takes this client's token for, and its role.
    pub async fn whoami(&self) -> anyhow::Result<Caller> {
        self.send(self.http.get(self.url(WHOAMI_PATH)?)).await
    }

    pub async fn tokens(&self) -> anyhow::Result<Vec<TokenView>> {
        self.send(self.http.get(self.url(TOKENS_PATH)?)).await
    }

    pub async fn create_token(&self, request: &TokenCreate) -> anyhow::Result<TokenCreated> {
        self.send(self.http.post(self.url(TOKENS_PATH)?).json(request))
            .await
    }

    pub async fn revoke_token(&self, id: i64) -> anyhow::Result<TokenView> {
        self.send(self.http.delete(self.url(&format!("{TOKENS_PATH}/{id}"))?))
            .await
    }

    pub async fn audit(&self, query: &AuditQuery) -> anyhow::Result<AuditPage> {
        self.send(self.http.get(self.url(AUDIT_PATH)?).query(query))
            .await
    }

    /// The server-sent event stream, filtered; read its body as it comes.
    /// The event stream `query` asks for; with `after_event`, resumed after
    /// that event (`Last-Event-ID`), as a reconnecting client asks.
    pub async fn event_stream(
        &self,
        query: &EventStreamQuery,
        after_event: Option<u64>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut request = self
            .streaming
            .get(self.url(EVENTS_PATH)?)
            .query(query)
            .bearer_auth(&self.token);
        if let Some(seq) = after_event {
            request = request.header("last-event-id", seq.to_string());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<WireError>(&body) {
            Ok(err) => Err(anyhow::Error::new(err).context(format!("server refused ({status})"))),
            Err(_) => anyhow::bail!(
                "server answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    pub async fn create_webhook(&self, request: &WebhookCreate) -> anyhow::Result<WebhookCreated> {
        self.send(self.http.post(self.url(WEBHOOKS_PATH)?).json(request))
            .await
    }

    /// Every published root of trust, oldest first.
    pub async fn roots(&self) -> anyhow::Result<Vec<uplift_proto::trust::RootView>> {
        self.send(self.http.get(self.url(uplift_proto::trust::ROOTS_PATH)?))
            .await
    }

    /// Publishes a signed root (its JSON file, as `uplift root` writes it).
    pub async fn publish_root(
        &self,
        signed_json: Vec<u8>,
    ) -> anyhow::Result<uplift_proto::trust::RootView> {
        self.send(
            self.http
                .post(self.url(uplift_proto::trust::ROOTS_PATH)?)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(signed_json),
        )
        .await
    }

    pub async fn webhooks(&self) -> anyhow::Result<Vec<WebhookView>> {
        self.send(self.http.get(self.url(WEBHOOKS_PATH)?)).await
    }

    pub async fn remove_webhook(&self, id: i64) -> anyhow::Result<WebhookView> {
        self.send(
            self.http
                .delete(self.url(&format!("{WEBHOOKS_PATH}/{id}"))?),
        )
        .await
    }

    /// Webhook `id`'s newest deliveries.
    pub async fn deliveries(&self, id: i64, limit: u32) -> anyhow::Result<Vec<DeliveryView>> {
        self.send(
            self.http
                .get(self.url(&format!("{WEBHOOKS_PATH}/{id}/deliveries"))?)
                .query(&[("limit", limit)]),
        )
        .await
    }

    /// Uploads a release directory: the chunks the server lacks, then the
    /// manifest (which the server accepts only once every chunk is there).
    /// `on_chunk` is called after each uploaded chunk with its stored size.
    pub async fn upload_release(
        &self,
        dir: &Path,
        on_chunk: impl Fn(u64) + Send + Sync,
    ) -> anyhow::Result<(ReleaseView, usize)> {
        let release = ReleaseDir::open(dir)?;
        let (signed, manifest) = release.read_release()?;
        let mut wanted: Vec<ChunkHash> = manifest.chunks.iter().map(|c| c.hash).collect();
        wanted.sort();
        wanted.dedup();
        let patches: Vec<ChunkHash> = manifest.patches.iter().map(|p| p.hash).collect();
        let missing: MissingChunksResponse = self
            .send(
                self.http
                    .post(self.url(MISSING_CHUNKS_PATH)?)
                    .json(&MissingChunksRequest {
                        chunks: wanted,
                        patches,
                    }),
            )
            .await?;
        let uploaded = missing.missing.len() + missing.missing_patches.len();
        let chunks = missing.missing.into_iter().map(|hash| (false, hash));
        let patches = missing.missing_patches.into_iter().map(|hash| (true, hash));
        stream::iter(chunks.chain(patches))
            .map(|(patch, hash)| {
                let release = &release;
                let on_chunk = &on_chunk;
                async move {
                    let what = if patch { "patch" } else { "chunk" };
                    let (bytes, path) = if patch {
                        (release.read_patch(&hash)?, admin_patch_path(&hash))
                    } else {
                        (release.read_chunk(&hash)?, admin_chunk_path(&hash))
                    };
                    let len = bytes.len() as u64;
                    let response = self
                        .http
                        .put(self.url(&path)?)
                        .bearer_auth(&self.token)
                        .body(bytes)
                        .send()
                        .await
                        .with_context(|| format!("uploading {what} {hash}"))?;
                    if !response.status().is_success() {
                        let status = response.status();
                        let text = response.text().await.unwrap_or_default();
                        anyhow::bail!("server refused {what} {hash} ({status}): {text}");
                    }
                    on_chunk(len);
                    Ok(())
                }
            })
            .buffer_unordered(UPLOAD_CONCURRENCY)
            .try_collect::<()>()
            .await?;
        if let Some(reference) = manifest.chunk_index {
            let index = release.read_index(&reference)?;
            let len = index.len() as u64;
            let response = self
                .http
                .put(self.url(&admin_index_path(&reference.sha256))?)
                .bearer_auth(&self.token)
                .body(index)
                .send()
                .await
                .context("uploading the chunk index")?;
            if !response.status().is_success() {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                anyhow::bail!("server refused the chunk index ({status}): {text}");
            }
            on_chunk(len);
        }
        let view = self
            .send(
                self.http
                    .post(self.url(RELEASES_PATH)?)
                    .body(signed.to_json()),
            )
            .await?;
        Ok((view, uploaded))
    }
}
