//! The agent's TOML configuration: where the server is, what to trust, which
//! slots and boot environment to use, and how to check health and reboot.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uplift_bootenv::{BootEnv, BootEnvFile, UBootCopy, UBootEnvStore, UBootLayout};
use uplift_proto::{DeviceType, HardwareId, SlotName, Version};
use uplift_release::keys::ReleasePublicKey;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `https://host:port` of the upgrade server.
    pub server_url: String,
    /// PEM CA certificate the server's certificate must chain to.
    pub server_ca: PathBuf,
    /// Fleet enrollment token, used only for the first connection.
    pub enrollment_token: String,
    pub device_type: DeviceType,
    /// Stable hardware identity; defaults to the contents of /etc/machine-id.
    pub hardware_id: Option<HardwareId>,
    /// Device key, device ID and install journal live here.
    pub state_dir: PathBuf,
    /// Release signing keys (`ed25519:<base64>`); a manifest must be signed
    /// by one. The simple mode: keys cannot be rotated over the air. Set
    /// this or `trusted_root`, not both.
    #[serde(default)]
    pub trusted_release_keys: Vec<ReleasePublicKey>,
    /// The signed root of trust shipped in the image (`uplift root init`):
    /// which keys sign releases, rotated over the air by newer roots (see
    /// [`crate::trust`]). The recommended mode.
    #[serde(default)]
    pub trusted_root: Option<PathBuf>,
    /// Version the device was imaged with, used until the agent has installed
    /// something itself.
    pub factory_version: Version,
    pub slots: Slots,
    pub boot: Boot,
    /// Command whose exit status 0 means the new OS is healthy.
    #[serde(default = "default_health_check")]
    pub health_check: Vec<String>,
    #[serde(default = "default_health_timeout")]
    pub health_check_timeout_secs: u64,
    /// Boots a new slot gets before the bootloader falls back.
    #[serde(default = "default_attempts")]
    pub trial_boot_attempts: u32,
    /// `uplift-agent trial-guard` reboots a trial boot whose slot is not
    /// committed within this many seconds of the guard's start.
    #[serde(default = "default_trial_deadline")]
    pub trial_deadline_secs: u64,
    #[serde(default)]
    pub reboot: Reboot,
    #[serde(default)]
    pub hooks: Hooks,
    #[serde(default)]
    pub download: Download,
    #[serde(default)]
    pub network: Network,
}

/// The device's private-network address, as the server assigns it (see
/// [`crate::address`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Run with the addresses in `UPLIFT_ADDRESS_V4`, `UPLIFT_ADDRESS_V6`
    /// (CIDR form; unset when the server assigns none of that family),
    /// `UPLIFT_ADDRESSES` (all, space-separated) and `UPLIFT_DEVICE_ID`,
    /// when they are new or changed: it sets them up (a WireGuard peer, a
    /// VLAN, a veth address). Unset: the addresses are logged, not applied.
    #[serde(default)]
    pub address_hook: Option<PathBuf>,
    /// Seconds the hook may take before it is killed and counts as failed.
    #[serde(default = "default_address_hook_timeout")]
    pub address_hook_timeout_secs: u64,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            address_hook: None,
            address_hook_timeout_secs: default_address_hook_timeout(),
        }
    }
}

fn default_address_hook_timeout() -> u64 {
    30
}

/// Bounds on how slowly the server may send. A read timeout alone lets a
/// hostile or broken server keep a device waiting for ever by trickling a
/// byte now and then (TUF's slow-retrieval attack), so every download also
/// has a deadline that grows with its size.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Download {
    /// Longest wait for the response headers, or between two reads.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_secs: u64,
    /// Slowest average rate accepted: a download of N bytes must end within
    /// `stall_timeout_secs + N / min_bytes_per_sec` seconds.
    #[serde(default = "default_min_rate")]
    pub min_bytes_per_sec: u64,
    /// How long a download waits for the device channel to come back (it
    /// carries the session token) before the attempt fails as
    /// `server_unreachable`.
    #[serde(default = "default_offline_wait")]
    pub offline_wait_secs: u64,
    /// Chunk requests in flight at once (each a span of neighbouring
    /// chunks): enough to keep a long link busy, few enough to stay small.
    #[serde(default = "default_parallel_requests")]
    pub parallel_requests: usize,
    /// This device's download cap; a rollout's cap (sent in its offer)
    /// applies too, and the lower one wins. Unset: no cap.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
    /// Bytes the server may send ahead of the slot writer, all requests
    /// together (the HTTP/2 connection window; each request gets its share
    /// of it). It bounds the agent's receive buffers; a link's rate is
    /// capped near this over its round trip, so raise it for fast links
    /// with long round trips (1 MiB: about 80 Mbit/s at 100 ms).
    #[serde(default = "default_receive_window")]
    pub receive_window_bytes: u32,
    /// Direct downloads: when the server redirects a chunk request to its
    /// object store (a presigned URL), the agent fetches it over HTTPS
    /// trusting this PEM bundle (say, `/etc/ssl/certs/ca-certificates.crt`
    /// for AWS S3); unset, the server's CA (`server_ca`) only.
    #[serde(default)]
    pub direct_ca_file: Option<PathBuf>,
    /// Accepts plain-HTTP presigned URLs (a store on a trusted network, or
    /// a test); off, a redirect to `http://` fails the request.
    #[serde(default)]
    pub direct_allow_http: bool,
    /// `https://host:port` of a site cache (or CDN) to download through
    /// instead of the server; the channel still goes to `server_url`. The
    /// cache must check every request's download token with the server
    /// (README: Running at scale). Unset: download from the server.
    #[serde(default)]
    pub url: Option<String>,
    /// PEM CA the site cache's certificate must chain to. Unset: `server_ca`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl Default for Download {
    fn default() -> Self {
        Self {
            stall_timeout_secs: default_stall_timeout(),
            min_bytes_per_sec: default_min_rate(),
            offline_wait_secs: default_offline_wait(),
            parallel_requests: default_parallel_requests(),
            max_bytes_per_sec: None,
            receive_window_bytes: default_receive_window(),
            direct_ca_file: None,
            direct_allow_http: false,
            url: None,
            ca: None,
        }
    }
}

fn default_receive_window() -> u32 {
    1 << 20
}

impl Download {
    /// Where downloads go: `url` if set (it must be `https`: the download
    /// token travels with every request), else the server.
    pub fn base_url(&self, server_url: &reqwest::Url) -> anyhow::Result<reqwest::Url> {
        let Some(url) = &self.url else {
            return Ok(server_url.clone());
        };
        let parsed: reqwest::Url = url
            .parse()
            .map_err(|e| anyhow::anyhow!("[download] url {url:?} is not a URL: {e}"))?;
        anyhow::ensure!(
            parsed.scheme() == "https" && parsed.host().is_some(),
            "[download] url {url:?} must be https://host[:port]: download tokens travel with every request"
        );
        Ok(parsed)
    }

    /// The CA that downloads' TLS must chain to.
    pub fn ca<'a>(&'a self, server_ca: &'a Path) -> &'a Path {
        self.ca.as_deref().unwrap_or(server_ca)
    }

    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs(self.stall_timeout_secs)
    }

    /// HTTP/2 windows: (per request, per connection), in bytes.
    pub fn receive_windows(&self) -> (u32, u32) {
        let connection = self.receive_window_bytes.max(64 << 10);
        let per_request = connection / self.parallel_requests.max(1) as u32;
        (per_request.max(64 << 10), connection)
    }

    /// How long a download of `bytes` may take in all.
    pub fn deadline_for(&self, bytes: u64) -> Duration {
        self.stall_timeout() + Duration::from_secs_f64(bytes as f64 / self.min_bytes_per_sec as f64)
    }
}

fn default_parallel_requests() -> usize {
    4
}
fn default_offline_wait() -> u64 {
    120
}
fn default_stall_timeout() -> u64 {
    30
}
/// 4 KiB/s: far below any link a fleet is upgraded over, so only a stalled
/// or hostile sender trips it; a 256 KiB chunk may then take 94 s.
fn default_min_rate() -> u64 {
    4096
}

/// Commands run around an install, with `UPLIFT_VERSION`, `UPLIFT_SLOT` and
/// `UPLIFT_SLOT_PATH` in their environment. A hook that fails (non-zero exit
/// or timeout) aborts the install before the boot choice changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Before the first byte is written to the inactive slot.
    pub pre_install: Option<Vec<String>>,
    /// After the image in the inactive slot is verified, before the switch.
    pub post_install: Option<Vec<String>>,
    #[serde(default = "default_hook_timeout")]
    pub timeout_secs: u64,
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            pre_install: None,
            post_install: None,
            timeout_secs: default_hook_timeout(),
        }
    }
}

fn default_hook_timeout() -> u64 {
    300
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slots {
    /// Partition or file holding slot A.
    pub a: PathBuf,
    pub b: PathBuf,
}

impl Slots {
    pub fn path(&self, slot: SlotName) -> &Path {
        match slot {
            SlotName::A => &self.a,
            SlotName::B => &self.b,
        }
    }
}

/// `[boot]`: the boot environment shared with the bootloader, checked when
/// the configuration is read.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "BootToml")]
pub struct Boot {
    /// Where the trial-boot state lives: a GRUB environment block or a
    /// U-Boot environment.
    pub env: BootEnv,
    /// Kernel command line holding `uplift.slot=a|b`.
    pub cmdline: PathBuf,
}

/// `[boot]` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootToml {
    /// `grub` (the default) or `uboot`.
    #[serde(default)]
    bootloader: Bootloader,
    /// GRUB environment block (e.g. /boot/grub/grubenv); GRUB only.
    env_file: Option<PathBuf>,
    /// Where the U-Boot environment is, as in `fw_env.config`; U-Boot only.
    uboot: Option<UBootToml>,
    #[serde(default = "default_cmdline")]
    cmdline: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Bootloader {
    #[default]
    Grub,
    Uboot,
}

/// `[boot.uboot]`: the lines of `fw_env.config`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UBootToml {
    /// Bytes of each copy: U-Boot's `CONFIG_ENV_SIZE`.
    env_size: u64,
    /// One copy, or two for the redundant layout (power-cut safe).
    copies: Vec<UBootCopyToml>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UBootCopyToml {
    device: PathBuf,
    offset: u64,
}

impl TryFrom<BootToml> for Boot {
    type Error = String;

    fn try_from(raw: BootToml) -> Result<Self, String> {
        let env = match (raw.bootloader, raw.env_file, raw.uboot) {
            (Bootloader::Grub, Some(path), None) => BootEnv::Grub(BootEnvFile::new(path)),
            (Bootloader::Grub, None, _) => {
                return Err("[boot] env_file must name the GRUB environment block (or set bootloader = \"uboot\" and [boot.uboot])".into())
            }
            (Bootloader::Grub, Some(_), Some(_)) => {
                return Err("[boot.uboot] is set but bootloader is \"grub\"; set bootloader = \"uboot\" or remove [boot.uboot]".into())
            }
            (Bootloader::Uboot, None, Some(u)) => {
                let size = usize::try_from(u.env_size)
                    .map_err(|_| format!("[boot.uboot] env_size {} is too large", u.env_size))?;
                let copies = u
                    .copies
                    .into_iter()
                    .map(|c| UBootCopy {
                        device: c.device,
                        offset: c.offset,
                    })
                    .collect();
                let layout = UBootLayout::new(copies, size).map_err(|e| e.to_string())?;
                BootEnv::UBoot(UBootEnvStore::new(layout))
            }
            (Bootloader::Uboot, _, None) => {
                return Err("bootloader = \"uboot\" needs [boot.uboot] with env_size and copies (the lines of fw_env.config)".into())
            }
            (Bootloader::Uboot, Some(_), Some(_)) => {
                return Err("[boot] env_file is for GRUB; with bootloader = \"uboot\" the environment is given by [boot.uboot]".into())
            }
        };
        Ok(Boot {
            env,
            cmdline: raw.cmdline,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reboot {
    /// Run a command (default `systemctl reboot`).
    Command { command: Vec<String> },
    /// Exit with `uplift_bootenv::REBOOT_REQUEST_EXIT_CODE` so a supervisor
    /// (the boot simulator) performs the reboot.
    Exit,
}

impl Default for Reboot {
    fn default() -> Self {
        Reboot::Command {
            command: vec!["systemctl".into(), "reboot".into()],
        }
    }
}

fn default_health_check() -> Vec<String> {
    vec!["true".into()]
}
fn default_health_timeout() -> u64 {
    120
}
/// Three tries, so a power cut during the new OS's first boot does not by
/// itself roll the update back (RAUC's default is the same).
fn default_attempts() -> u32 {
    3
}
/// Well past the default health check timeout (120 s) plus a slow boot.
fn default_trial_deadline() -> u64 {
    600
}
fn default_cmdline() -> PathBuf {
    PathBuf::from("/proc/cmdline")
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read agent config {}: {e}", path.display()))?;
        let config: Self = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid agent config {}: {e}", path.display()))?;
        match (&config.trusted_root, config.trusted_release_keys.is_empty()) {
            (None, true) => anyhow::bail!(
                "{}: nothing to trust releases with: set trusted_root to the signed root \
                 shipped in the image (`uplift root init`), or trusted_release_keys to the \
                 public keys printed by `uplift keygen`",
                path.display()
            ),
            (Some(_), false) => anyhow::bail!(
                "{}: both trusted_root and trusted_release_keys are set; keep one: with a \
                 root, the root names the release keys",
                path.display()
            ),
            (Some(root), true) => {
                crate::trust::read_root(root).map_err(|e| {
                    anyhow::anyhow!("{}: trusted_root {}: {e}", path.display(), root.display())
                })?;
            }
            (None, false) => {}
        }
        if config.health_check.is_empty() {
            anyhow::bail!("{}: health_check must name a command", path.display());
        }
        if let Ok(server_url) = config.server_url.parse::<reqwest::Url>() {
            config
                .download
                .base_url(&server_url)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        for (key, value) in [
            ("min_bytes_per_sec", config.download.min_bytes_per_sec),
            ("stall_timeout_secs", config.download.stall_timeout_secs),
            ("offline_wait_secs", config.download.offline_wait_secs),
            (
                "parallel_requests",
                config.download.parallel_requests as u64,
            ),
            (
                "max_bytes_per_sec",
                config.download.max_bytes_per_sec.unwrap_or(1),
            ),
            (
                "receive_window_bytes",
                u64::from(config.download.receive_window_bytes),
            ),
        ] {
            if value == 0 {
                anyhow::bail!("{}: [download] {key} must be at least 1", path.display());
            }
        }
        if config.trial_deadline_secs <= config.health_check_timeout_secs {
            anyhow::bail!(
                "{}: trial_deadline_secs ({}) must be larger than health_check_timeout_secs ({}), \
                 or the trial guard reboots every new OS before its health check can pass",
                path.display(),
                config.trial_deadline_secs,
                config.health_check_timeout_secs
            );
        }
        let max = uplift_bootenv::state::MAX_TRIAL_TRIES;
        if !(1..=max).contains(&config.trial_boot_attempts) {
            anyhow::bail!(
                "{}: trial_boot_attempts must be 1 to {max} (what the GRUB and U-Boot scripts count)",
                path.display()
            );
        }
        Ok(config)
    }

    pub fn hardware_id(&self) -> anyhow::Result<HardwareId> {
        if let Some(id) = &self.hardware_id {
            return Ok(id.clone());
        }
        let text = std::fs::read_to_string("/etc/machine-id").map_err(|e| {
            anyhow::anyhow!("hardware_id not configured and /etc/machine-id unreadable: {e}")
        })?;
        text.trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("/etc/machine-id: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_may_take_the_stall_timeout_plus_its_size_at_the_minimum_rate() {
        let download = Download::default();
        assert_eq!(download.deadline_for(0), Duration::from_secs(30));
        assert_eq!(download.deadline_for(256 * 1024), Duration::from_secs(94));
        let tight = Download {
            stall_timeout_secs: 2,
            min_bytes_per_sec: 1 << 20,
            offline_wait_secs: 1,
            ..Download::default()
        };
        assert_eq!(tight.deadline_for(512 * 1024), Duration::from_millis(2500));
    }

    #[test]
    fn downloads_go_to_the_server_unless_a_site_cache_is_named_over_https() {
        let server: reqwest::Url = "https://uplift.example.net:8443".parse().unwrap();
        let server_ca = Path::new("/etc/uplift/ca.pem");
        let direct = Download::default();
        assert_eq!(direct.base_url(&server).unwrap(), server);
        assert_eq!(direct.ca(server_ca), server_ca);
        let cached = Download {
            url: Some("https://cache.site.example:8443".into()),
            ca: Some("/etc/uplift/site-ca.pem".into()),
            ..Download::default()
        };
        assert_eq!(
            cached.base_url(&server).unwrap().as_str(),
            "https://cache.site.example:8443/"
        );
        assert_eq!(cached.ca(server_ca), Path::new("/etc/uplift/site-ca.pem"));
        for bad in [
            "http://cache.site.example",
            "cache.site.example",
            "https://",
        ] {
            let download = Download {
                url: Some(bad.into()),
                ..Download::default()
            };
            let err = download.base_url(&server).unwrap_err().to_string();
            assert!(err.contains("[download] url"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_zero_minimum_rate_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let config = r#"
server_url = "https://127.0.0.1:8443"
server_ca = "/etc/uplift/ca.pem"
enrollment_token = "t"
device_type = "gw"
state_dir = "/var/lib/uplift-agent"
trusted_release_keys = ["ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="]
factory_version = "1.0"
[slots]
a = "/dev/a"
b = "/dev/b"
[boot]
env_file = "/boot/grub/grubenv"
"#;
        std::fs::write(&path, config).unwrap();
        let loaded = AgentConfig::load(&path).unwrap();
        assert_eq!(loaded.download.min_bytes_per_sec, 4096);

        // A health check allowed to outlast the trial deadline would have
        // every new OS rebooted by the trial guard before it can pass.
        let slow_check = config.replacen("[slots]", "health_check_timeout_secs = 900\n[slots]", 1);
        std::fs::write(&path, slow_check).unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("trial_deadline_secs (600)")
                && err.contains("health_check_timeout_secs (900)"),
            "{err}"
        );

        std::fs::write(
            &path,
            format!("{config}[download]\nmin_bytes_per_sec = 0\n"),
        )
        .unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("agent.toml") && err.contains("min_bytes_per_sec"),
            "{err}"
        );
    }

    #[test]
    fn exactly_one_of_a_root_and_a_key_list_is_trusted() {
        use uplift_release::keys::ReleaseSigningKey;
        use uplift_release::root::{Role, Root, ROOT_FORMAT};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let key = ReleaseSigningKey::from_seed([3; 32]);
        let role = Role::one(key.public_key());
        let root = Root {
            format: ROOT_FORMAT,
            version: 1,
            expires_at: "2030-01-01T00:00:00Z".into(),
            root: role.clone(),
            release: role,
            freshness: None,
        };
        let root_path = dir.path().join("root.json");
        std::fs::write(&root_path, root.sign(&[&key]).unwrap().to_json()).unwrap();
        let unsigned_path = dir.path().join("unsigned.json");
        std::fs::write(&unsigned_path, root.sign(&[]).unwrap().to_json()).unwrap();
        let head = r#"
server_url = "https://127.0.0.1:8443"
server_ca = "/etc/uplift/ca.pem"
enrollment_token = "t"
device_type = "gw"
state_dir = "/var/lib/uplift-agent"
factory_version = "1.0"
"#;
        let tail = "[slots]\na = \"/dev/a\"\nb = \"/dev/b\"\n[boot]\nenv_file = \"/g\"\n";
        let keys =
            "trusted_release_keys = [\"ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"]\n";
        let load = |trust: String| {
            std::fs::write(&path, format!("{head}{trust}{tail}")).unwrap();
            AgentConfig::load(&path).map_err(|e| e.to_string())
        };
        let with_root = format!("trusted_root = {:?}\n", root_path.display().to_string());
        assert!(load(with_root.clone()).unwrap().trusted_root.is_some());
        assert_eq!(load(keys.into()).unwrap().trusted_release_keys.len(), 1);
        let err = load(String::new()).unwrap_err();
        assert!(err.contains("nothing to trust releases with"), "{err}");
        let err = load(format!("{with_root}{keys}")).unwrap_err();
        assert!(
            err.contains("both trusted_root and trusted_release_keys"),
            "{err}"
        );
        // A shipped root not signed by its own root keys is found at once.
        let err = load(format!(
            "trusted_root = {:?}\n",
            unsigned_path.display().to_string()
        ))
        .unwrap_err();
        assert!(
            err.contains("unsigned.json") && err.contains("signed by 0 of the 1 root keys"),
            "{err}"
        );
    }

    #[test]
    fn boot_selects_grub_by_default_or_uboot_with_its_copies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let head = r#"
server_url = "https://127.0.0.1:8443"
server_ca = "/etc/uplift/ca.pem"
enrollment_token = "t"
device_type = "gw"
state_dir = "/var/lib/uplift-agent"
trusted_release_keys = ["ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="]
factory_version = "1.0"
[slots]
a = "/dev/a"
b = "/dev/b"
"#;
        let load = |boot: &str| {
            std::fs::write(&path, format!("{head}{boot}")).unwrap();
            AgentConfig::load(&path).map_err(|e| e.to_string())
        };

        let grub = load("[boot]\nenv_file = \"/boot/grub/grubenv\"\n").unwrap();
        assert_eq!(
            grub.boot.env,
            BootEnv::Grub(BootEnvFile::new("/boot/grub/grubenv"))
        );
        assert_eq!(grub.boot.cmdline, Path::new("/proc/cmdline"));

        let uboot = load(
            r#"[boot]
bootloader = "uboot"
[boot.uboot]
env_size = 0x2000
copies = [
  { device = "/dev/mmcblk0", offset = 0x3f8000 },
  { device = "/dev/mmcblk0", offset = 0x3fa000 },
]
"#,
        )
        .unwrap();
        let BootEnv::UBoot(store) = &uboot.boot.env else {
            panic!("expected U-Boot, got {:?}", uboot.boot.env);
        };
        assert_eq!(
            store.layout().fw_env_config(),
            "/dev/mmcblk0 0x3f8000 0x2000\n/dev/mmcblk0 0x3fa000 0x2000\n"
        );

        for (boot, want) in [
            ("[boot]\n", "env_file must name"),
            ("[boot]\nbootloader = \"uboot\"\n", "needs [boot.uboot]"),
            (
                "[boot]\nbootloader = \"uboot\"\nenv_file = \"/x\"\n[boot.uboot]\nenv_size = 8192\ncopies = [{ device = \"/e\", offset = 0 }]\n",
                "env_file is for GRUB",
            ),
            (
                "[boot]\nenv_file = \"/x\"\n[boot.uboot]\nenv_size = 8192\ncopies = [{ device = \"/e\", offset = 0 }]\n",
                "bootloader is \"grub\"",
            ),
            (
                "[boot]\nbootloader = \"uboot\"\n[boot.uboot]\nenv_size = 8192\ncopies = [{ device = \"/e\", offset = 0 }, { device = \"/e\", offset = 4096 }]\n",
                "overlap",
            ),
            (
                "[boot]\nbootloader = \"uboot\"\n[boot.uboot]\nenv_size = 8192\ncopies = [{ device = \"/e\", offset = 0, size = 1 }]\n",
                "unknown field `size`",
            ),
            ("[boot]\nbootloader = \"lilo\"\nenv_file = \"/x\"\n", "unknown variant `lilo`"),
        ] {
            let err = load(boot).unwrap_err();
            assert!(err.contains(want) && err.contains("agent.toml"), "{boot}: {err}");
        }
    }
}
