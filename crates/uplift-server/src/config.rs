//! Server configuration: a TOML file, overridable from the command line.
//! Everything has a default so `uplift-server --data-dir DIR` just works.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// When set, the admin API is served here only (say, on a management
    /// network), and `listen` carries device traffic alone.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// Holds the database, chunk store, generated TLS material and tokens.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub tls: TlsConfig,
    /// Fleet enrollment tokens accepted from new devices. When empty, one is
    /// generated into `<data_dir>/enrollment-token` on first start.
    #[serde(default)]
    pub enrollment_tokens: Vec<String>,
    /// Bearer token for the admin API. When unset, one is generated into
    /// `<data_dir>/admin-token` on first start.
    #[serde(default)]
    pub admin_token: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub artifacts: ArtifactsConfig,
    #[serde(default)]
    pub download_tokens: DownloadTokens,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub addresses: AddressesConfig,
    #[serde(default)]
    pub enrollment: EnrollmentConfig,
    #[serde(default)]
    pub trust: TrustConfig,
}

/// How new devices join the fleet (see [`crate::service::enrollment`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentConfig {
    #[serde(default)]
    pub mode: EnrollmentMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollmentMode {
    /// A device with a valid enrollment token is enrolled at once.
    #[default]
    Tokens,
    /// A device with a valid enrollment token waits, connected, in a
    /// pending list until an operator accepts or rejects it.
    Approval,
}

/// The server's online key for signed freshness on offers (see
/// [`crate::freshness`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// PKCS#8 PEM ed25519 key (`uplift keygen`), not a release key: its
    /// public key goes in the root's freshness role (`uplift root next
    /// --freshness-key`). Unset: offers carry no freshness, and devices
    /// whose root requires it refuse them.
    #[serde(default)]
    pub freshness_key: Option<PathBuf>,
    /// How long each offer's freshness is valid.
    #[serde(default = "default_freshness_ttl")]
    pub freshness_ttl_secs: u64,
}

impl Default for TrustConfig {
    fn default() -> Self {
        Self {
            freshness_key: None,
            freshness_ttl_secs: default_freshness_ttl(),
        }
    }
}

fn default_freshness_ttl() -> u64 {
    3600
}

/// Each device's private-network address (see [`crate::addresses`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressesConfig {
    /// CIDRs devices' addresses come from, at most one IPv4 and one IPv6
    /// (`["10.77.0.0/16", "fd77::/64"]`); each device gets one address of
    /// each. Empty (the default): devices get none.
    #[serde(default)]
    pub pool: Vec<String>,
}

/// Where the server keeps its state: SQLite in the data directory (the
/// default, nothing to set up) or a PostgreSQL database that several
/// server replicas share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/database` (libpq's URL, with
    /// its parameters such as `sslmode=verify-full`); unset: SQLite in
    /// `<data_dir>/uplift.db`.
    #[serde(default)]
    pub url: Option<String>,
    /// Connections this server keeps to PostgreSQL at most.
    #[serde(default = "default_database_connections")]
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: default_database_connections(),
        }
    }
}

/// Which database a [`DatabaseConfig`] selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres { url: String, max_connections: u32 },
}

impl ServerConfig {
    /// The database this server uses.
    pub fn database(&self) -> Database {
        match &self.database.url {
            Some(url) => Database::Postgres {
                url: url.clone(),
                max_connections: self.database.max_connections,
            },
            None => Database::Sqlite(self.data_dir.join("uplift.db")),
        }
    }
}

// Enough for the writer, the scheduler and a burst of admin requests; a
// few replicas together stay well below PostgreSQL's default of 100.
fn default_database_connections() -> u32 {
    16
}

/// Where chunks, patches and chunk indexes are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Directories under `data_dir`: zero set-up, one server.
    #[default]
    Local,
    /// An S3-compatible bucket, shared by every server of a fleet.
    S3,
}

/// `[artifacts]`: the chunk store, and whether devices download from it
/// directly.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactsConfig {
    #[serde(default)]
    pub backend: Backend,
    /// S3: the bucket (required).
    #[serde(default)]
    pub bucket: Option<String>,
    /// S3: the endpoint URL of an S3-compatible store (MinIO, Ceph, ...);
    /// unset means AWS S3 in `region`.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// S3 credentials; when unset, `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (and the other usual `AWS_*` variables).
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Keys are kept under this prefix of the bucket ("" for its root), so
    /// several fleets can share one.
    #[serde(default)]
    pub prefix: String,
    /// Allows an `http://` endpoint (a store on the same host or a trusted
    /// network); off, only HTTPS.
    #[serde(default)]
    pub allow_http: bool,
    /// Seconds one request to the store may take, retries included, before
    /// the device's request fails (and the device retries).
    #[serde(default = "default_store_request_secs")]
    pub request_timeout_secs: u64,
    /// Devices download chunks straight from the store: the server checks
    /// the device's request as always, then answers 307 with a presigned
    /// URL instead of the bytes.
    #[serde(default)]
    pub direct_downloads: bool,
    /// Seconds a presigned URL stays valid.
    #[serde(default = "default_presign_secs")]
    pub presign_secs: u64,
}

// Not derived: the secret stays out of logs and error messages.
impl std::fmt::Debug for ArtifactsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactsConfig")
            .field("backend", &self.backend)
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<set>"),
            )
            .field("prefix", &self.prefix)
            .field("allow_http", &self.allow_http)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("direct_downloads", &self.direct_downloads)
            .field("presign_secs", &self.presign_secs)
            .finish()
    }
}

impl Default for ArtifactsConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Local,
            bucket: None,
            endpoint: None,
            region: default_region(),
            access_key_id: None,
            secret_access_key: None,
            prefix: String::new(),
            allow_http: false,
            request_timeout_secs: default_store_request_secs(),
            direct_downloads: false,
            presign_secs: default_presign_secs(),
        }
    }
}

/// Signed device download tokens (see [`crate::download_token`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadTokens {
    /// The keys that sign and check them. Replicas behind one balancer
    /// must list the same keys. Unset: `<data_dir>/download-token-keys`,
    /// generated on first start.
    #[serde(default)]
    pub keys_file: Option<PathBuf>,
    /// How long a token is valid; the channel brings a fresh one when half
    /// of it is left.
    #[serde(default = "default_token_lifetime")]
    pub lifetime_secs: u64,
}

impl Default for DownloadTokens {
    fn default() -> Self {
        Self {
            keys_file: None,
            lifetime_secs: default_token_lifetime(),
        }
    }
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_store_request_secs() -> u64 {
    10
}
// Long enough for one chunk on a slow link (1 MiB at 10 KiB/s is some 100
// s), short enough that a URL copied out of a device's log is soon useless.
fn default_presign_secs() -> u64 {
    300
}

/// S3 refuses presigned URLs valid for longer than seven days.
const MAX_PRESIGN_SECS: u64 = 7 * 86_400;

impl ArtifactsConfig {
    /// The choices that cannot work, said before the server starts.
    pub fn check(&self) -> Result<(), String> {
        match self.backend {
            Backend::Local => {
                if self.direct_downloads {
                    return Err(
                        "[artifacts] direct_downloads needs backend = \"s3\": a local directory has no URLs to hand out"
                            .into(),
                    );
                }
            }
            Backend::S3 => {
                if self.bucket.as_deref().is_none_or(|b| b.trim().is_empty()) {
                    return Err("[artifacts] backend = \"s3\" needs a bucket".into());
                }
                if let Some(endpoint) = &self.endpoint {
                    if endpoint.starts_with("http://") && !self.allow_http {
                        return Err(format!(
                            "[artifacts] endpoint {endpoint} is plain HTTP; use https, or set allow_http = true \
                             for a store on a trusted network"
                        ));
                    }
                }
                if self.access_key_id.is_some() != self.secret_access_key.is_some() {
                    return Err(
                        "[artifacts] access_key_id and secret_access_key go together; \
                         set both, or neither to take them from the AWS_* environment"
                            .into(),
                    );
                }
            }
        }
        if !(1..=MAX_PRESIGN_SECS).contains(&self.presign_secs) {
            return Err(format!(
                "[artifacts] presign_secs must be 1 to {MAX_PRESIGN_SECS} (seven days, S3's limit), not {}",
                self.presign_secs
            ));
        }
        if self.request_timeout_secs == 0 {
            return Err("[artifacts] request_timeout_secs must be at least 1".into());
        }
        Ok(())
    }
}

impl DownloadTokens {
    /// Shortest lifetime accepted: the renewal is sent at the channel's
    /// first 20 s tick past half the lifetime, so at 60 s it arrives at
    /// least 10 s before the old token expires.
    pub const MIN_LIFETIME_SECS: u64 = 60;

    pub fn keys_file(&self, data_dir: &Path) -> PathBuf {
        self.keys_file
            .clone()
            .unwrap_or_else(|| data_dir.join("download-token-keys"))
    }
}

fn default_token_lifetime() -> u64 {
    600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; with `key_file`, replaces the generated one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Names and addresses the generated certificate is valid for.
    #[serde(default = "default_hostnames")]
    pub hostnames: Vec<String>,
}

// Not derived: a config file without a `[tls]` table must still get a
// certificate valid for the default names, not one valid for no name at all.
impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            hostnames: default_hostnames(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Concurrent HTTP connections: downloads, admin calls, and device
    /// channels until their WebSocket upgrade (then they count below).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Concurrent device channels, a budget of their own.
    #[serde(default = "default_max_device_channels")]
    pub max_device_channels: usize,
    /// Device downloads (chunks, manifests) being served at once.
    #[serde(default = "default_max_download_requests")]
    pub max_download_requests: usize,
    /// Admin API requests being served at once.
    #[serde(default = "default_max_admin_requests")]
    pub max_admin_requests: usize,
    /// Seconds a client has to finish the TLS handshake / send headers.
    #[serde(default = "default_handshake_secs")]
    pub handshake_timeout_secs: u64,
    /// Seconds a device channel may stay silent before it is closed.
    #[serde(default = "default_idle_secs")]
    pub channel_idle_timeout_secs: u64,
    /// Seconds a new device channel has to enroll or authenticate.
    #[serde(default = "default_auth_secs")]
    pub auth_timeout_secs: u64,
    /// Cap on the bytes per second all device downloads together send
    /// (one token bucket shared by every download). Unset: no cap.
    #[serde(default)]
    pub max_egress_bytes_per_sec: Option<u64>,
    /// History events kept per device (`uplift devices history`); older
    /// ones are dropped as new ones are written.
    #[serde(default = "default_history_per_device")]
    pub device_history_per_device: u32,
    /// Days a history event is kept at most; 0 keeps them regardless of age.
    #[serde(default = "default_history_days")]
    pub device_history_days: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_device_channels: default_max_device_channels(),
            max_download_requests: default_max_download_requests(),
            max_admin_requests: default_max_admin_requests(),
            handshake_timeout_secs: default_handshake_secs(),
            channel_idle_timeout_secs: default_idle_secs(),
            auth_timeout_secs: default_auth_secs(),
            max_egress_bytes_per_sec: None,
            device_history_per_device: default_history_per_device(),
            device_history_days: default_history_days(),
        }
    }
}

impl Limits {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    pub fn channel_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.channel_idle_timeout_secs)
    }
    pub fn auth_timeout(&self) -> Duration {
        Duration::from_secs(self.auth_timeout_secs)
    }
    /// How long history events are kept, if there is an age limit.
    pub fn device_history_age(&self) -> Option<Duration> {
        (self.device_history_days > 0)
            .then(|| Duration::from_secs(u64::from(self.device_history_days) * 86_400))
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_hostnames() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}
// Together with the channels, below the 20 000 open files a process may
// have on common hosts, with room for the database and chunk files.
fn default_max_connections() -> usize {
    4_096
}
fn default_max_device_channels() -> usize {
    15_000
}
fn default_max_download_requests() -> usize {
    512
}
fn default_max_admin_requests() -> usize {
    64
}
fn default_handshake_secs() -> u64 {
    10
}
fn default_idle_secs() -> u64 {
    90
}
fn default_auth_secs() -> u64 {
    15
}
// Two hundred events are some twenty upgrades with their steps, and at
// 100 000 devices some 20 million rows: a few GiB of SQLite at most.
fn default_history_per_device() -> u32 {
    200
}
fn default_history_days() -> u32 {
    90
}

impl ServerConfig {
    pub fn with_data_dir(data_dir: PathBuf) -> Self {
        Self {
            listen: default_listen(),
            admin_listen: None,
            data_dir,
            tls: TlsConfig::default(),
            enrollment_tokens: Vec::new(),
            enrollment: EnrollmentConfig::default(),
            admin_token: None,
            limits: Limits::default(),
            artifacts: ArtifactsConfig::default(),
            download_tokens: DownloadTokens::default(),
            database: DatabaseConfig::default(),
            addresses: AddressesConfig::default(),
            trust: TrustConfig::default(),
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read server config {}: {e}", path.display()))?;
        let config: Self = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid server config {}: {e}", path.display()))?;
        config
            .check()
            .map_err(|e| anyhow::anyhow!("server config {}: {e}", path.display()))?;
        Ok(config)
    }

    /// An empty or short secret would let anyone enroll or administer; a zero
    /// budget would refuse every request of its kind.
    pub fn check(&self) -> Result<(), String> {
        const MIN: usize = 16;
        if let Some(token) = &self.admin_token {
            if token.trim().len() < MIN {
                return Err(format!("admin_token must be at least {MIN} characters; or omit it to have one generated"));
            }
        }
        for (name, value) in [
            ("max_connections", self.limits.max_connections),
            ("max_device_channels", self.limits.max_device_channels),
            ("max_download_requests", self.limits.max_download_requests),
            ("max_admin_requests", self.limits.max_admin_requests),
            (
                "device_history_per_device",
                self.limits.device_history_per_device as usize,
            ),
        ] {
            if value == 0 {
                return Err(format!("[limits] {name} must be at least 1"));
            }
        }
        if self.download_tokens.lifetime_secs < DownloadTokens::MIN_LIFETIME_SECS {
            return Err(format!(
                "[download_tokens] lifetime_secs must be at least {}: the channel renews a token \
                 when half of its life is left, on a 20 s tick",
                DownloadTokens::MIN_LIFETIME_SECS
            ));
        }
        crate::addresses::Pools::parse(&self.addresses.pool).map_err(|e| e.to_string())?;
        if let Some(url) = &self.database.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err("[database] url must be a PostgreSQL URL (postgres://user:password@host:port/database); \
                     leave it out to use SQLite in the data directory"
                    .into());
            }
            if self.database.max_connections == 0 {
                return Err("[database] max_connections must be at least 1".into());
            }
        }
        if self.enrollment_tokens.iter().any(|t| t.trim().len() < MIN) {
            return Err(format!("every enrollment token must be at least {MIN} characters; or omit them to have one generated"));
        }
        self.artifacts.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_without_optional_tables_gets_the_defaults() {
        let config: ServerConfig = toml::from_str("data_dir = \"/var/lib/uplift\"\n").unwrap();
        assert_eq!(config.tls.hostnames, default_hostnames());
        assert_eq!(config.limits.auth_timeout(), Duration::from_secs(15));
        let config: ServerConfig =
            toml::from_str("data_dir = \"/x\"\n[limits]\nauth_timeout_secs = 2\n").unwrap();
        assert_eq!(config.limits.auth_timeout(), Duration::from_secs(2));
        assert_eq!(config.limits.handshake_timeout(), Duration::from_secs(10));
        assert_eq!(config.limits.device_history_per_device, 200);
        assert_eq!(
            config.limits.device_history_age(),
            Some(Duration::from_secs(90 * 86_400))
        );
        let config: ServerConfig = toml::from_str(
            "data_dir = \"/x\"\n[limits]\ndevice_history_per_device = 0\ndevice_history_days = 0\n",
        )
        .unwrap();
        assert_eq!(config.limits.device_history_age(), None);
        let err = config.check().unwrap_err();
        assert!(err.contains("device_history_per_device"), "{err}");
    }

    #[test]
    fn artifacts_default_to_the_local_directory_and_s3_needs_what_it_cannot_guess() {
        let config: ServerConfig = toml::from_str("data_dir = \"/x\"\n").unwrap();
        assert_eq!(config.artifacts.backend, Backend::Local);
        assert!(!config.artifacts.direct_downloads);
        config.check().unwrap();
        let with = |table: &str| {
            let config: ServerConfig =
                toml::from_str(&format!("data_dir = \"/x\"\n[artifacts]\n{table}")).unwrap();
            config.check()
        };
        let err = with("direct_downloads = true\n").unwrap_err();
        assert!(err.contains("needs backend"), "{err}");
        let err = with("backend = \"s3\"\n").unwrap_err();
        assert!(err.contains("needs a bucket"), "{err}");
        let err = with("backend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\n")
            .unwrap_err();
        assert!(err.contains("allow_http"), "{err}");
        let err = with("backend = \"s3\"\nbucket = \"b\"\naccess_key_id = \"k\"\n").unwrap_err();
        assert!(err.contains("go together"), "{err}");
        let err = with("backend = \"s3\"\nbucket = \"b\"\npresign_secs = 0\n").unwrap_err();
        assert!(err.contains("presign_secs"), "{err}");
        with(
            "backend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n\
             direct_downloads = true\npresign_secs = 60\n",
        )
        .unwrap();
        let shown = format!(
            "{:?}",
            ArtifactsConfig {
                secret_access_key: Some("very-secret".into()),
                ..ArtifactsConfig::default()
            }
        );
        assert!(!shown.contains("very-secret"), "{shown}");
    }

    #[test]
    fn the_example_config_in_deploy_parses_and_passes_its_checks() {
        let text = include_str!("../../../deploy/server.toml");
        let config: ServerConfig = toml::from_str(text).unwrap();
        config.check().unwrap();
        assert_eq!(config.limits.device_history_per_device, 200);
        assert_eq!(config.limits.device_history_days, 90);
        assert_eq!(
            config.database(),
            Database::Sqlite("/var/lib/uplift/uplift.db".into())
        );
    }

    #[test]
    fn a_database_url_selects_postgresql_and_must_be_one() {
        let config: ServerConfig = toml::from_str(
            "data_dir = \"/x\"\n[database]\nurl = \"postgres://uplift@db:5432/uplift\"\n",
        )
        .unwrap();
        assert_eq!(
            config.database(),
            Database::Postgres {
                url: "postgres://uplift@db:5432/uplift".into(),
                max_connections: 16
            }
        );
        config.check().unwrap();
        let config: ServerConfig =
            toml::from_str("data_dir = \"/x\"\n[database]\nurl = \"mysql://db/uplift\"\n").unwrap();
        let err = config.check().unwrap_err();
        assert!(err.contains("PostgreSQL URL"), "{err}");
    }

    #[test]
    fn address_pools_are_checked_at_start_with_an_error_naming_the_entry() {
        let with = |pool: &str| -> ServerConfig {
            toml::from_str(&format!("data_dir = \"/x\"\n[addresses]\npool = {pool}\n")).unwrap()
        };
        with(r#"["10.77.0.0/16", "fd77::/64"]"#).check().unwrap();
        let err = with(r#"["10.77.0.0/16", "10.78.0.5/16"]"#)
            .check()
            .unwrap_err();
        assert!(err.contains("\"10.78.0.5/16\" has host bits set"), "{err}");
        assert!(err.contains("write its network, 10.78.0.0/16"), "{err}");
        let err = with(r#"["10.77.0.0/33"]"#).check().unwrap_err();
        assert!(err.contains("is not a CIDR"), "{err}");
    }
}
