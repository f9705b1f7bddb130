//! Command-line definitions and their implementations.

use crate::output::{mib, table};
use crate::watch::awaiting_reboot;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;
use std::time::Duration;
use uplift_client::AdminClient;
use uplift_fleet::demo::{self, DemoOptions};
use uplift_proto::api::{
    DeviceEvent, DeviceEventKind, DevicePage, DeviceQuery, DeviceView, DownloadLimits,
    FleetSummary, HistoryQuery, RolloutCommandName, RolloutCreate, RolloutPreview, RolloutStatus,
    RolloutView, TagChange, TagSelector,
};
use uplift_proto::channel::AgentState;
use uplift_proto::policy::{
    ErrorThreshold, PhaseReach, Ramp, RolloutPolicy, WindowScope, WindowSpec,
};
use uplift_proto::{DeviceId, DeviceType, Tag, Version};
use uplift_release::build::{create_release, ReleaseOptions};
use uplift_release::keys::{write_public_key_file, ReleaseSigningKey};

#[derive(Debug, Parser)]
#[command(
    name = "uplift",
    version,
    about = "Uplift: upgrade the operating system of a whole fleet, safely"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Server URL.
    #[arg(long, env = "UPLIFT_SERVER", default_value = "https://127.0.0.1:8443")]
    pub server: String,
    /// CA certificate the server's certificate chains to (printed by uplift-server at start).
    #[arg(long, env = "UPLIFT_CA")]
    pub ca: PathBuf,
    /// API token: the server's admin token, or one made with `uplift token create` (or use --token-file).
    #[arg(long, env = "UPLIFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the API token, e.g. <data_dir>/admin-token.
    #[arg(long, env = "UPLIFT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl ServerArgs {
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading API token {}", path.display()))?,
            (None, None) => {
                anyhow::bail!("give an API token with --token, --token-file or UPLIFT_TOKEN")
            }
        };
        AdminClient::new(&self.server, &self.ca, &token)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a release signing key pair (keep the private key off the server).
    Keygen {
        /// Private key file to create (PKCS#8 PEM, mode 0600); the public key goes beside it as .pub.
        #[arg(long, default_value = "release.key")]
        out: PathBuf,
    },
    /// Build, upload and list releases.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// The root of trust: the key ceremony (init, next, sign) and
    /// publishing roots to the server.
    #[command(subcommand)]
    Root(crate::root::RootCommand),
    /// List devices.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// The fleet at a glance: devices by version, state and type, how many
    /// are online, failing, rolled back or in a rollout.
    Fleet {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Start and follow rollouts.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Make, list and revoke API tokens with roles (admin).
    #[command(subcommand)]
    Token(crate::access::TokenCommand),
    /// The audit log: who changed what, when, and how it ended (admin).
    Audit(crate::access::AuditArgs),
    /// Device and rollout events as they happen, one JSON object a line.
    Events(crate::events::EventsArgs),
    /// Deliver events to other systems: HMAC-signed POSTs, retried, logged (admin).
    #[command(subcommand)]
    Webhook(crate::events::WebhookCommand),
    /// Who the server takes your token for, and its role.
    Whoami {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run a whole fleet upgrade on this machine: a real server and N real agents.
    Demo {
        #[arg(long, default_value_t = 50)]
        devices: usize,
        /// Size of the generated OS image in MiB.
        #[arg(long, default_value_t = 8)]
        image_mib: u64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Keep the demo's files (server data, device slots, logs) in this directory.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Give up on any one stage (enrollment, the rollout, its settling)
        /// after this many seconds; the whole run is bounded by three times
        /// this plus three minutes.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Inject faults at random during the rollout: agents killed with
        /// SIGKILL, every connection cut, the server killed and restarted.
        #[arg(long)]
        chaos: bool,
        /// Roll out this image (version 1.1) instead of a generated one.
        #[arg(long)]
        image: Option<PathBuf>,
        /// Devices start running this image (version 1.0) instead of a
        /// generated one; with --image, its size is the slot size.
        #[arg(long)]
        factory_image: Option<PathBuf>,
        /// Cap each device's download rate in the demo's rollout (bytes/s).
        #[arg(long, value_name = "BYTES")]
        max_bytes_per_sec: Option<NonZeroU64>,
        /// At most this many devices download at once in the demo's rollout.
        #[arg(long, value_name = "N")]
        max_downloading: Option<NonZeroU32>,
        /// Cap the server's egress, all downloads together (bytes/s).
        #[arg(long, value_name = "BYTES")]
        server_max_egress: Option<NonZeroU64>,
        /// Run the server in this network namespace (made beforehand, as
        /// bench/run does for its emulated link); needs --server-addr and
        /// --device-netns-prefix.
        #[arg(long, requires_all = ["server_addr", "device_netns_prefix"])]
        server_netns: Option<String>,
        /// The server's address inside --server-netns, reachable from here.
        #[arg(long, requires = "server_netns")]
        server_addr: Option<std::net::IpAddr>,
        /// Device i runs in network namespace PREFIX<i>.
        #[arg(long, value_name = "PREFIX", requires = "server_netns")]
        device_netns_prefix: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Cut an image into content-defined chunks, compress them, and write a signed manifest.
    Create {
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        version: Version,
        #[arg(long)]
        device_type: DeviceType,
        /// Release signing key from `uplift keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Output directory (manifest.json + chunks/).
        #[arg(long)]
        out: PathBuf,
        /// Days the manifest stays valid; agents refuse an expired one.
        #[arg(long, default_value_t = 365)]
        valid_days: i64,
        /// An older release (its directory, or its image) to make patches
        /// against: devices running it download only the patches for the
        /// chunks it lacks; any other device fetches those chunks whole.
        #[arg(long, value_name = "OLD_RELEASE_DIR_OR_IMAGE")]
        delta_from: Option<PathBuf>,
        /// Allow this release to replace versions newer than itself, up to
        /// and including VERSION: the release key's permission to
        /// downgrade devices running them (a rollout must still ask, with
        /// `--allow-downgrade`). Without it no rollout can downgrade to it.
        #[arg(long, value_name = "VERSION")]
        may_replace_up_to: Option<Version>,
    },
    /// Add a signature to a release's manifest, in place: for a device
    /// root whose release role needs several release keys.
    Sign {
        /// The release directory (`uplift release create --out`).
        dir: PathBuf,
        /// A release key (`uplift keygen`).
        #[arg(long)]
        key: PathBuf,
    },
    /// Upload a release directory to the server.
    Upload {
        dir: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List releases on the server.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Enrolled devices with their version, state, progress, last error and
    /// tags, by ID, a page at a time (every filter given must hold).
    List {
        #[command(flatten)]
        filter: DeviceFilterArgs,
        /// Devices per page (1 to 1000; the server's default is 100).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Start after this cursor: the `next` a previous page printed.
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
        /// Every page, not only the first.
        #[arg(long)]
        all: bool,
        /// The page as JSON (`{"devices": [...], "next": ...}`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// One device.
    Show {
        id: DeviceId,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Change a device's tags (rollouts can target devices by tag).
    Tag {
        id: DeviceId,
        /// Tags to add; repeat or separate with commas.
        #[arg(long, value_delimiter = ',', value_name = "TAG")]
        add: Vec<Tag>,
        /// Tags to remove; repeat or separate with commas.
        #[arg(long, value_delimiter = ',', value_name = "TAG")]
        remove: Vec<Tag>,
        /// Remove every tag first.
        #[arg(long)]
        clear: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Remove (decommission) a device: its key is revoked (its channel is
    /// closed now and it cannot connect again), its unfinished rollout
    /// parts end, its private addresses are freed; its history is kept. A
    /// replaced board with the same hardware ID enrolls afresh with the
    /// fleet token, as a new device.
    Remove {
        id: DeviceId,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Enrollment requests waiting for an operator (the server's
    /// `[enrollment] mode = "approval"`): each with its hardware ID, device
    /// type, key fingerprint and when it asked.
    Pending {
        /// Decided requests too (accepted and rejected).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Accept enrollment request ID (pending, or rejected before): the
    /// device gets its device ID at once, over the connection it waits on.
    Accept {
        id: i64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Reject pending enrollment request ID: the device is told why and
    /// stops; its key is refused from now on (accept it to undo this).
    Reject {
        id: i64,
        /// Told to the device, kept with the request (at most 200 characters).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// What happened to a device: offers, downloads (bytes fetched and
    /// reused), installs, reboots, commits, rollbacks and errors, oldest first.
    History {
        id: DeviceId,
        /// Events at most (1 to 1000; the server's default is 100), the newest.
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Only events older than this event id (the cursor a page printed).
        #[arg(long, value_name = "EVENT")]
        before: Option<i64>,
        /// The page as JSON, newest first.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Which devices `devices list` shows (`uplift_proto::api::DeviceQuery`).
#[derive(Debug, Clone, Args)]
pub struct DeviceFilterArgs {
    /// Only devices of this type.
    #[arg(long = "type", value_name = "TYPE")]
    device_type: Option<DeviceType>,
    /// Only devices running this version.
    #[arg(long)]
    version: Option<Version>,
    /// Only devices in this state: idle, downloading, verifying,
    /// reboot_pending, testing, failed or rolled_back.
    #[arg(long, value_parser = parse_state)]
    state: Option<AgentState>,
    /// Only devices with this tag.
    #[arg(long)]
    tag: Option<Tag>,
    /// Only devices connected now.
    #[arg(long, conflicts_with = "offline")]
    online: bool,
    /// Only devices not connected now.
    #[arg(long)]
    offline: bool,
    /// Only devices whose ID or hardware ID holds this text.
    #[arg(long, value_name = "TEXT")]
    search: Option<String>,
    /// Only devices last seen before this time (RFC 3339), or never.
    #[arg(long, value_name = "TIME")]
    seen_before: Option<String>,
    /// Only devices seen after this time (RFC 3339); connected ones count as seen now.
    #[arg(long, value_name = "TIME")]
    seen_after: Option<String>,
}

impl DeviceFilterArgs {
    fn into_query(self) -> DeviceQuery {
        DeviceQuery {
            device_type: self.device_type,
            version: self.version,
            state: self.state,
            tag: self.tag,
            online: match (self.online, self.offline) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            q: self.search,
            seen_before: self.seen_before,
            seen_after: self.seen_after,
            after: None,
            limit: None,
        }
    }
}

/// An agent state by its wire name (`reboot_pending`).
fn parse_state(text: &str) -> Result<AgentState, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|_| {
        format!(
            "{text:?} is not a device state; give idle, downloading, verifying, reboot_pending, \
             testing, failed or rolled_back"
        )
    })
}

#[derive(Debug, Args)]
pub struct RolloutTarget {
    id: i64,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// How a rollout proceeds (`uplift_proto::policy::RolloutPolicy`).
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// A phase, as a share of the target (`10%`) or a device count (`5`),
    /// cumulative; repeat in order (`--phase 1% --phase 10% --phase 50%`).
    /// The rest of the target is the final phase.
    #[arg(long = "phase", value_name = "REACH", value_parser = parse_reach)]
    phases: Vec<PhaseReach>,
    /// Share of a phase's devices that must run the release before the next
    /// phase starts (default 100).
    #[arg(long, value_name = "PERCENT")]
    success_percent: Option<u8>,
    /// Seconds a phase must hold its success level before the next starts.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    soak_secs: u64,
    /// Start each phase after the first only on `uplift rollout approve`.
    #[arg(long)]
    approval: bool,
    /// Devices of the release's type that enroll while the rollout runs
    /// join it, in its current phase (not with --devices); with --tag,
    /// devices that come to have the tags join it.
    #[arg(long, conflicts_with = "devices")]
    dynamic: bool,
    /// Pause the rollout when more than this share of a phase's finished
    /// devices failed (default 0: the first failure pauses).
    #[arg(long, value_name = "PERCENT", default_value_t = 0)]
    error_threshold: u8,
    /// Finished devices a phase needs before the threshold applies.
    #[arg(long, value_name = "N", default_value_t = 1)]
    min_finished: u32,
    /// A device offered the release that has not finished in this many
    /// seconds counts as failed.
    #[arg(long, value_name = "SECONDS")]
    device_timeout_secs: Option<u64>,
    /// Maintenance window: new downloads start only when it is open (or,
    /// with --window-applies-to reboot, devices reboot only then). A cron
    /// schedule of its openings ("0 2 * * *"), with --window-minutes.
    #[arg(long, value_name = "CRON", requires = "window_minutes")]
    window: Option<String>,
    #[arg(long, value_name = "MINUTES", requires = "window")]
    window_minutes: Option<u32>,
    /// The window's time zone (IANA name).
    #[arg(long, value_name = "ZONE", default_value = "UTC", requires = "window")]
    time_zone: String,
    /// What the window governs: `downloads` (no new download starts outside
    /// it) or `reboot` (devices download and verify at once, and reboot
    /// into the release only inside it).
    #[arg(
        long,
        value_name = "WHAT",
        default_value = "downloads",
        requires = "window"
    )]
    window_applies_to: WindowScope,
    /// Offer at most this many devices per minute at first (exponential
    /// ramp; with --ramp-factor-percent and --ramp-step-successes).
    #[arg(long, value_name = "N", requires_all = ["ramp_factor_percent", "ramp_step_successes"])]
    ramp_base_per_minute: Option<NonZeroU32>,
    #[arg(long, value_name = "PERCENT", requires = "ramp_base_per_minute")]
    ramp_factor_percent: Option<u32>,
    #[arg(long, value_name = "N", requires = "ramp_base_per_minute")]
    ramp_step_successes: Option<NonZeroU32>,
}

impl PolicyArgs {
    fn into_policy(self) -> anyhow::Result<RolloutPolicy> {
        let policy = RolloutPolicy {
            phases: self.phases,
            success_percent: self.success_percent,
            soak_seconds: self.soak_secs,
            approval: self.approval,
            dynamic: self.dynamic,
            error_threshold: ErrorThreshold {
                percent: self.error_threshold,
                min_finished: self.min_finished,
            },
            device_timeout_seconds: self.device_timeout_secs,
            ramp: match (
                self.ramp_base_per_minute,
                self.ramp_factor_percent,
                self.ramp_step_successes,
            ) {
                (Some(base_per_minute), Some(factor_percent), Some(step_successes)) => Some(Ramp {
                    base_per_minute,
                    factor_percent,
                    step_successes,
                }),
                _ => None,
            },
            window: match (self.window, self.window_minutes) {
                (Some(cron), Some(duration_minutes)) => Some(WindowSpec {
                    cron,
                    duration_minutes,
                    time_zone: self.time_zone,
                    applies_to: self.window_applies_to,
                }),
                _ => None,
            },
        };
        policy.check()?;
        Ok(policy)
    }
}

/// `10%` or `5`.
fn parse_reach(text: &str) -> Result<PhaseReach, String> {
    let bad = || format!("{text:?} is not a phase; give a share like 10% or a device count like 5");
    match text.strip_suffix('%') {
        Some(percent) => percent
            .trim()
            .parse()
            .map(PhaseReach::Percent)
            .map_err(|_| bad()),
        None => text
            .trim()
            .parse()
            .map(PhaseReach::Count)
            .map_err(|_| bad()),
    }
}

/// How `rollout start --tag` matches several tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TagsMatch {
    Any,
    All,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Offer a release to devices (all devices of its type unless --devices is given).
    Start {
        #[arg(long)]
        release: Version,
        /// Comma-separated device IDs.
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<DeviceId>>,
        /// Only devices of the release's type with this tag; repeat (or
        /// separate with commas) for several, see --tags-match.
        #[arg(
            long = "tag",
            value_name = "TAG",
            value_delimiter = ',',
            conflicts_with = "devices"
        )]
        tags: Vec<Tag>,
        /// With several --tag: devices with any of them, or with all.
        #[arg(long, value_enum, default_value_t = TagsMatch::Any, requires = "tags")]
        tags_match: TagsMatch,
        /// Only devices running this version; repeat for several.
        #[arg(long = "from-version", value_name = "VERSION", value_delimiter = ',')]
        from_versions: Vec<Version>,
        /// Allow devices to install a version older than the one they run;
        /// only to a release signed as allowed to replace it (`release
        /// create --may-replace-up-to`).
        #[arg(long)]
        allow_downgrade: bool,
        /// Cap each device's download rate (bytes/s); devices keep to the
        /// lower of this and their own `[download] max_bytes_per_sec`.
        #[arg(long, value_name = "BYTES")]
        max_bytes_per_sec: Option<NonZeroU64>,
        /// At most this many devices of the rollout download at once; the
        /// others wait their turn.
        #[arg(long, value_name = "N")]
        max_downloading: Option<NonZeroU32>,
        // Boxed: the policy's many options would make every other command
        // as large as this one.
        #[command(flatten)]
        policy: Box<PolicyArgs>,
        /// Start nothing: show the devices it would target, its phase sizes
        /// and warnings (the server checks it as it would a start).
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a rollout's progress (the newest if no ID is given); --watch
    /// keeps it live, with a progress bar per phase.
    Status {
        id: Option<i64>,
        #[arg(long, short, visible_alias = "follow", short_alias = 'f')]
        watch: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Stop offering the release to more devices; those working finish.
    Pause(RolloutTarget),
    /// Continue a paused rollout (failures seen so far no longer count).
    Resume(RolloutTarget),
    /// Start the next phase of a rollout waiting for approval.
    Approve(RolloutTarget),
    /// End a rollout: nothing more is offered, unfinished offers are withdrawn.
    Abort(RolloutTarget),
    /// Start a new rollout of the devices that failed or timed out in this one.
    Retry(RolloutTarget),
    /// A rollout's devices: the phase each is in, whether it was offered
    /// the release, and how its part ended.
    Devices(RolloutTarget),
    /// List rollouts.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

fn enrollments_table(requests: &[uplift_proto::enrollment::EnrollmentRequestView]) -> String {
    let mut out = format!(
        "{:<6} {:<10} {:<20} {:<16} {:<26} {:<24} {}",
        "ID", "STATE", "HARDWARE ID", "TYPE", "ASKED AT", "KEY", "DEVICE / REASON"
    );
    for r in requests {
        let what = match (&r.device_id, &r.reason) {
            (Some(id), _) => id.to_string(),
            (None, Some(reason)) => reason.clone(),
            (None, None) => "-".to_owned(),
        };
        // The fingerprint's first 16 hex digits: enough to tell devices
        // apart on a screen; `--json` has it whole.
        let key: String = r.key_fingerprint.chars().take(7 + 16).collect();
        out.push_str(&format!(
            "\n{:<6} {:<10} {:<20} {:<16} {:<26} {:<24} {}",
            r.id,
            r.state.as_str(),
            r.hardware_id,
            r.device_type,
            r.requested_at,
            key,
            what
        ));
    }
    out
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `value` as JSON (`--json`) or as the text `text` makes of it.
pub(crate) fn print_as<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        print_json(value)
    } else {
        println!("{}", text(value));
        Ok(())
    }
}

/// Runs a command; the returned code is the process exit status.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Keygen { out } => keygen(out),
        Command::Release(cmd) => release(cmd).await,
        Command::Root(cmd) => crate::root::root(cmd).await,
        Command::Devices(cmd) => devices(cmd).await,
        Command::Fleet { json, server } => {
            let summary = server.client()?.fleet().await?;
            print_as(json, &summary, fleet_text)?;
            Ok(0)
        }
        Command::Rollout(cmd) => rollout(cmd).await,
        Command::Token(cmd) => crate::access::token(cmd).await,
        Command::Audit(args) => crate::access::audit(args).await,
        Command::Events(args) => crate::events::events(args).await,
        Command::Webhook(cmd) => crate::events::webhook(cmd).await,
        Command::Whoami { json, server } => crate::access::whoami(server, json).await,
        Command::Demo {
            devices,
            image_mib,
            json,
            workdir,
            timeout,
            chaos,
            image,
            factory_image,
            max_bytes_per_sec,
            max_downloading,
            server_max_egress,
            server_netns,
            server_addr,
            device_netns_prefix,
        } => {
            let netns = match (server_netns, server_addr, device_netns_prefix) {
                (Some(server), Some(server_addr), Some(device_prefix)) => Some(demo::DemoNetns {
                    server,
                    server_addr,
                    device_prefix,
                }),
                _ => None,
            };
            let summary = demo::run(DemoOptions {
                devices,
                image_size: image_mib * 1024 * 1024,
                json,
                workdir,
                timeout: Duration::from_secs(timeout),
                chaos,
                image,
                factory_image,
                netns,
                limits: DownloadLimits {
                    max_bytes_per_sec,
                    max_downloading,
                },
                server_max_egress: server_max_egress.map(NonZeroU64::get),
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                for failure in &summary.failures {
                    eprintln!("  failed: {failure}");
                }
                println!("{}", summary.line());
            }
            Ok(if summary.failed == 0 { 0 } else { 1 })
        }
    }
}

fn keygen(out: PathBuf) -> anyhow::Result<i32> {
    let key = ReleaseSigningKey::generate();
    key.write_to_file(&out)?;
    let public = out.with_extension("pub");
    write_public_key_file(&public, &key.public_key())?;
    println!(
        "private key: {} (keep it secret, off the server)",
        out.display()
    );
    println!("public key:  {}", public.display());
    println!(
        "add to each agent's config:\n  trusted_release_keys = [\"{}\"]",
        key.public_key()
    );
    Ok(0)
}

async fn release(cmd: ReleaseCommand) -> anyhow::Result<i32> {
    match cmd {
        ReleaseCommand::Sign { dir, key } => {
            let release = uplift_release::build::ReleaseDir::open(&dir)?;
            let mut signed = release.read_manifest()?;
            let key = ReleaseSigningKey::read_from_file(&key)?;
            signed.add_signature(&key);
            uplift_files::replace_file(
                &release.manifest_path(),
                &signed.to_json(),
                uplift_files::Access::Public,
            )
            .with_context(|| format!("writing {}", release.manifest_path().display()))?;
            println!(
                "signed with key {}; the manifest now carries {} signatures",
                key.public_key().key_id(),
                signed.signatures.len()
            );
            Ok(0)
        }
        ReleaseCommand::Create {
            image,
            version,
            device_type,
            key,
            out,
            valid_days,
            delta_from,
            may_replace_up_to,
        } => {
            let key = ReleaseSigningKey::read_from_file(&key)?;
            let mut options = ReleaseOptions::new(version, device_type);
            options.valid_for = time::Duration::days(valid_days);
            options.delta_from = delta_from;
            options.may_replace_up_to = may_replace_up_to;
            let summary =
                tokio::task::spawn_blocking(move || create_release(&image, &out, &options, &key))
                    .await??;
            println!(
                "release {} for {}: {} image, {} chunks ({} unique), {} compressed\nmanifest: {}",
                summary.manifest.version,
                summary.manifest.device_type,
                mib(summary.image_size),
                summary.chunk_count,
                summary.unique_chunks,
                mib(summary.stored_bytes),
                summary.manifest_path.display()
            );
            if !summary.manifest.patches.is_empty() {
                let stored: std::collections::HashMap<_, _> = summary
                    .manifest
                    .chunks
                    .iter()
                    .map(|c| (c.hash, u64::from(c.stored_size)))
                    .collect();
                let patched: u64 = summary
                    .manifest
                    .patches
                    .iter()
                    .filter_map(|p| stored.get(&p.chunk))
                    .sum();
                println!(
                    "patches: {} chunks as {} instead of {} for devices running the older release",
                    summary.manifest.patches.len(),
                    mib(summary.manifest.patch_bytes()),
                    mib(patched)
                );
            }
            Ok(0)
        }
        ReleaseCommand::Upload { dir, server } => {
            let client = server.client()?;
            let bar = if std::io::stderr().is_terminal() {
                ProgressBar::new_spinner()
            } else {
                ProgressBar::hidden()
            };
            bar.set_style(
                ProgressStyle::with_template("{spinner} uploading {bytes} ({bytes_per_sec})")
                    .expect("valid"),
            );
            let (view, uploaded) = client.upload_release(&dir, |n| bar.inc(n)).await?;
            bar.finish_and_clear();
            println!(
                "uploaded release {} for {}: {} chunks ({uploaded} new), {} image",
                view.version,
                view.device_type,
                view.chunks,
                mib(view.image_size)
            );
            Ok(0)
        }
        ReleaseCommand::List { json, server } => {
            let releases = server.client()?.releases().await?;
            if json {
                print_json(&releases)?;
            } else {
                let rows = releases
                    .iter()
                    .map(|r| {
                        vec![
                            r.version.to_string(),
                            r.device_type.to_string(),
                            mib(r.image_size),
                            r.chunks.to_string(),
                            mib(r.stored_bytes),
                            r.created_at.clone(),
                            r.expires_at.clone().unwrap_or_else(|| "-".to_owned()),
                            match r.key_ids.as_slice() {
                                [] => "-".to_owned(),
                                ids => ids.join(","),
                            },
                            match r.damaged_chunks {
                                0 => "ok".to_owned(),
                                n => format!("{n} chunks damaged: upload it again"),
                            },
                        ]
                    })
                    .collect::<Vec<_>>();
                for r in releases.iter().filter(|r| r.damaged_chunks > 0) {
                    eprintln!(
                        "warning: release {} has {} chunks damaged on the server; devices cannot install it \
                         until you run `uplift release upload` with its release directory again",
                        r.version, r.damaged_chunks
                    );
                }
                println!(
                    "{}",
                    table(
                        &[
                            "VERSION",
                            "DEVICE TYPE",
                            "IMAGE",
                            "CHUNKS",
                            "STORED",
                            "CREATED",
                            "EXPIRES",
                            "SIGNED BY",
                            "HEALTH"
                        ],
                        &rows
                    )
                );
            }
            Ok(0)
        }
    }
}

async fn devices(cmd: DevicesCommand) -> anyhow::Result<i32> {
    match cmd {
        DevicesCommand::List {
            filter,
            limit,
            after,
            all,
            json,
            server,
        } => {
            let client = server.client()?;
            let query = DeviceQuery {
                after,
                limit,
                ..filter.into_query()
            };
            let page = if all {
                DevicePage {
                    devices: client.devices_where(&query).await?,
                    next: None,
                }
            } else {
                client.devices_page(&query).await?
            };
            if json {
                print_json(&page)?;
            } else {
                println!("{}", devices_table(&page.devices));
                if let Some(next) = &page.next {
                    println!("next page: --after {next}");
                }
            }
            Ok(0)
        }
        DevicesCommand::Show { id, json, server } => {
            let device = server.client()?.device(&id).await?;
            if json {
                print_json(&device)?;
            } else {
                println!("{}", device_text(&device));
            }
            Ok(0)
        }
        DevicesCommand::Tag {
            id,
            add,
            remove,
            clear,
            json,
            server,
        } => {
            let change = TagChange {
                set: clear.then(Vec::new),
                remove,
                add,
            };
            let device = server.client()?.tag_device(&id, &change).await?;
            if json {
                print_json(&device)?;
            } else {
                println!("{}: {}", device.id, tags_text(&device.tags));
            }
            Ok(0)
        }
        DevicesCommand::Remove { id, json, server } => {
            let device = server.client()?.remove_device(&id).await?;
            if json {
                print_json(&device)?;
            } else {
                println!(
                    "{} removed at {}: its key is revoked and its channel closed; its history is kept",
                    device.id,
                    device.removed_at.as_deref().unwrap_or("-")
                );
            }
            Ok(0)
        }
        DevicesCommand::Pending { all, json, server } => {
            let state = (!all).then_some(uplift_proto::enrollment::EnrollmentState::Pending);
            let requests = server.client()?.enrollments(state).await?;
            if json {
                print_json(&requests)?;
            } else if requests.is_empty() {
                println!(
                    "no enrollment requests{}",
                    if all { "" } else { " waiting" }
                );
            } else {
                println!("{}", enrollments_table(&requests));
            }
            Ok(0)
        }
        DevicesCommand::Accept { id, json, server } => {
            let request = server.client()?.accept_enrollment(id).await?;
            if json {
                print_json(&request)?;
            } else {
                println!(
                    "enrollment {id} ({}) accepted: device {}",
                    request.hardware_id,
                    request.device_id.as_ref().map_or("-", |d| d.as_str())
                );
            }
            Ok(0)
        }
        DevicesCommand::Reject {
            id,
            reason,
            json,
            server,
        } => {
            let request = server.client()?.reject_enrollment(id, reason).await?;
            if json {
                print_json(&request)?;
            } else {
                println!(
                    "enrollment {id} ({}) rejected: the device is told so and refused from now on",
                    request.hardware_id
                );
            }
            Ok(0)
        }
        DevicesCommand::History {
            id,
            limit,
            before,
            json,
            server,
        } => {
            let history = server
                .client()?
                .device_history(&id, &HistoryQuery { limit, before })
                .await?;
            if json {
                print_json(&history)?;
            } else {
                println!("{}", history_table(&history.events));
                if let Some(next) = history.next {
                    println!("older events: --before {next}");
                }
            }
            Ok(0)
        }
    }
}

fn tags_text(tags: &[Tag]) -> String {
    if tags.is_empty() {
        "no tags".to_owned()
    } else {
        tags.iter().map(Tag::as_str).collect::<Vec<_>>().join(", ")
    }
}

/// One device, a field a line.
fn device_text(d: &DeviceView) -> String {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let mut lines = vec![
        ("id", d.id.to_string()),
        ("type", d.device_type.to_string()),
        ("hardware id", d.hardware_id.to_string()),
        ("online", if d.online { "yes" } else { "no" }.to_owned()),
        (
            // Kept while offline: where it was last connected from.
            if d.online { "address" } else { "last address" },
            or_dash(d.address.clone()),
        ),
        (
            // The private-network addresses the server assigned it.
            "private addr",
            if d.private_addresses.is_empty() {
                "-".to_owned()
            } else {
                d.private_addresses.join(", ")
            },
        ),
        (
            "version",
            or_dash(d.running_version.as_ref().map(ToString::to_string)),
        ),
        ("slot", or_dash(d.slot.map(|s| s.to_string()))),
        ("state", or_dash(d.state.map(|s| s.as_str().to_owned()))),
        (
            "target",
            or_dash(d.target_version.as_ref().map(|v| match d.rollout_id {
                Some(r) => format!("{v} (rollout {r})"),
                None => v.to_string(),
            })),
        ),
        (
            "progress",
            or_dash(d.progress.filter(|p| p.total_bytes > 0).map(|p| {
                format!(
                    "{} of {} ({} fetched)",
                    mib(p.done_bytes),
                    mib(p.total_bytes),
                    mib(p.fetched_bytes)
                )
            })),
        ),
        (
            "last error",
            or_dash(d.last_error.as_ref().map(ToString::to_string)),
        ),
        ("tags", tags_text(&d.tags)),
        ("enrolled", d.enrolled_at.clone()),
        ("last seen", or_dash(d.last_seen.clone())),
    ];
    if let Some(at) = &d.removed_at {
        lines.push(("removed", format!("{at} (key revoked; history kept)")));
    }
    lines
        .iter()
        .map(|(name, value)| format!("{:<13} {value}", format!("{name}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What one history event says, in words.
fn event_text(event: &DeviceEventKind) -> String {
    match event {
        DeviceEventKind::Offer {
            rollout_id,
            version,
        } => format!("rollout {rollout_id} offers {version}"),
        DeviceEventKind::Withdrawn { rollout_id } => {
            format!("rollout {rollout_id} withdrew its offer")
        }
        DeviceEventKind::DownloadStarted {
            version,
            total_bytes: Some(total),
        } => format!("{version}, {} image", mib(*total)),
        DeviceEventKind::DownloadStarted {
            version,
            total_bytes: None,
        } => version.to_string(),
        DeviceEventKind::DownloadFinished {
            version,
            total_bytes,
            fetched_bytes,
            reused_bytes,
        } => format!(
            "{version}: fetched {}, reused {} of {}",
            mib(*fetched_bytes),
            mib(*reused_bytes),
            mib(*total_bytes)
        ),
        DeviceEventKind::Installed { version, slot } => {
            format!("{version} written to slot {slot} and verified")
        }
        DeviceEventKind::Reboot {
            from_slot,
            to_slot,
            running_version,
        } => format!("slot {from_slot} -> {to_slot}, running {running_version}"),
        DeviceEventKind::Committed { version, slot } => format!("{version} on slot {slot}"),
        DeviceEventKind::RolledBack {
            version,
            running_version,
            error,
        } => {
            let tried = version
                .as_ref()
                .map_or("the trial".to_owned(), ToString::to_string);
            match error {
                Some(error) => format!("{tried} failed, back on {running_version}: {error}"),
                None => format!("{tried} failed, back on {running_version}"),
            }
        }
        DeviceEventKind::Error { version, error } => match version {
            Some(version) => format!("{version}: {error}"),
            None => error.to_string(),
        },
        DeviceEventKind::Removed { by } => format!("removed from the fleet by {by}"),
    }
}

/// Events oldest first (a page comes newest first).
fn history_table(events: &[DeviceEvent]) -> String {
    let rows = events
        .iter()
        .rev()
        .map(|e| {
            vec![
                e.at.clone(),
                e.event.name().to_owned(),
                event_text(&e.event),
            ]
        })
        .collect::<Vec<_>>();
    table(&["AT", "EVENT", "WHAT"], &rows)
}

/// `uplift fleet`: the totals in a line, then devices by version, state
/// and type, most first.
pub fn fleet_text(f: &FleetSummary) -> String {
    let versions: Vec<Vec<String>> = f
        .by_version
        .iter()
        .map(|v| {
            vec![
                v.version
                    .as_ref()
                    .map_or_else(|| "- (never reported)".to_owned(), ToString::to_string),
                v.devices.to_string(),
                v.online.to_string(),
            ]
        })
        .collect();
    let states: Vec<Vec<String>> = f
        .by_state
        .iter()
        .map(|s| {
            vec![
                s.state.map_or_else(
                    || "- (never reported)".to_owned(),
                    |s| s.as_str().to_owned(),
                ),
                s.devices.to_string(),
            ]
        })
        .collect();
    let types: Vec<Vec<String>> = f
        .by_device_type
        .iter()
        .map(|t| {
            vec![
                t.device_type.to_string(),
                t.devices.to_string(),
                t.online.to_string(),
            ]
        })
        .collect();
    format!(
        "{} devices, {} online: {} failing, {} rolled back, {} in a rollout\n\n{}\n\n{}\n\n{}",
        f.devices_total,
        f.online,
        f.failing,
        f.rolled_back,
        f.in_rollout,
        table(&["VERSION", "DEVICES", "ONLINE"], &versions),
        table(&["STATE", "DEVICES"], &states),
        table(&["TYPE", "DEVICES", "ONLINE"], &types),
    )
}

/// `uplift rollout start --dry-run`: what it would start.
pub fn preview_text(p: &RolloutPreview) -> String {
    let sizes: Vec<String> = p.phase_sizes.iter().map(u64::to_string).collect();
    let mut text = format!(
        "would start a rollout of {} ({}) to {} device{}; devices per phase: {}\n\
         nothing was started (a start puts other devices in each phase, the same number)",
        p.release,
        p.device_type,
        p.devices_total,
        if p.devices_total == 1 { "" } else { "s" },
        sizes.join(" / ")
    );
    for warning in &p.warnings {
        text += &format!("\nwarning: {warning}");
    }
    text
}

pub fn devices_table(devices: &[DeviceView]) -> String {
    let dash = || "-".to_owned();
    let rows = devices
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.device_type.to_string(),
                if d.online { "yes" } else { "no" }.to_owned(),
                d.address.clone().unwrap_or_else(dash),
                if d.private_addresses.is_empty() {
                    dash()
                } else {
                    d.private_addresses.join(",")
                },
                d.running_version
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_else(dash),
                d.slot.map(|s| s.to_string()).unwrap_or_else(dash),
                d.state.map(|s| s.as_str().to_owned()).unwrap_or_else(dash),
                d.target_version
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_else(dash),
                d.progress
                    .filter(|p| p.total_bytes > 0)
                    .map(|p| format!("{}%", p.done_bytes * 100 / p.total_bytes))
                    .unwrap_or_else(dash),
                d.tags.iter().map(Tag::as_str).collect::<Vec<_>>().join(","),
                d.last_error
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "ID", "TYPE", "ONLINE", "ADDRESS", "PRIVATE", "VERSION", "SLOT", "STATE", "TARGET",
            "PROGRESS", "TAGS", "ERROR",
        ],
        &rows,
    )
}

/// One rollout in words. A superseded rollout says so instead of reading
/// like a finished one where nothing happened: its devices are counted by
/// the newer rollout that took them over.
async fn command_rollout(
    target: RolloutTarget,
    command: RolloutCommandName,
) -> anyhow::Result<i32> {
    let view = target
        .server
        .client()?
        .command_rollout(target.id, command)
        .await?;
    if target.json {
        print_json(&view)?;
    } else {
        println!("{}", rollout_line(&view));
    }
    Ok(0)
}

fn rollout_line(r: &RolloutView) -> String {
    let head = format!("rollout {} of {} ({})", r.id, r.release, r.device_type);
    let devices = |n: u64| format!("{n} device{}", if n == 1 { "" } else { "s" });
    if r.devices_total == 0 {
        return format!("{head}: {} — it targeted no devices", r.status);
    }
    if r.status == RolloutStatus::Superseded {
        let all = if r.devices_total == 1 {
            "its only device".to_owned()
        } else {
            format!("all {}", devices(r.devices_total))
        };
        return format!(
            "{head}: superseded — {all} moved to {}",
            newer_rollouts(&r.superseded_by)
        );
    }
    let mut line = format!(
        "{head}: {} — {} succeeded, {} in progress{}, {} pending, {} failed of {}",
        r.status,
        r.counts.succeeded,
        r.counts.in_progress,
        awaiting_reboot(r),
        r.counts.pending,
        r.counts.failed,
        devices(r.devices_total)
    );
    if r.superseded > 0 {
        line += &format!(
            " ({} moved to {})",
            r.superseded,
            newer_rollouts(&r.superseded_by)
        );
    }
    if !r.supersedes.is_empty() {
        let from: Vec<String> = r
            .supersedes
            .iter()
            .map(|s| format!("{} from rollout {}", devices(s.devices), s.rollout_id))
            .collect();
        line += &format!("; took over {}", from.join(", "));
    }
    if let Some(tags) = &r.tags {
        line += &format!("; devices with {tags}");
    }
    if !r.from_versions.is_empty() {
        let versions: Vec<&str> = r.from_versions.iter().map(Version::as_str).collect();
        line += &format!("; only from {}", versions.join(" or "));
    }
    if let Some(k) = r.limits.max_downloading {
        line += &format!(
            "; at most {k} downloading at once, {} waiting for a turn",
            r.waiting_for_turn
        );
    }
    if let Some(rate) = r.limits.max_bytes_per_sec {
        line += &format!(
            "; each device capped at {}/s",
            crate::output::mib(rate.get())
        );
    }
    if let Some(p) = &r.progress {
        let sizes: Vec<String> = p.phase_sizes.iter().map(u64::to_string).collect();
        line += &match p.phase {
            Some(phase) => format!(
                "\n  {} in phase {} of {} (devices per phase: {})",
                p.state.replace('_', " "),
                phase + 1,
                p.phases,
                sizes.join(" / ")
            ),
            None => format!("\n  {} (devices per phase: {})", p.state, sizes.join(" / ")),
        };
        if let Some(why) = &p.paused_because {
            line += &format!("\n  {why}");
        }
    }
    line
}

/// A rollout's devices, one row each, by phase.
pub fn members_table(members: &[uplift_proto::api::RolloutMember]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                (m.phase + 1).to_string(),
                m.device_id.to_string(),
                m.hardware_id.to_string(),
                m.offered_at.clone().unwrap_or_else(|| "-".into()),
                m.outcome.clone().unwrap_or_else(|| "-".into()),
                m.running_version
                    .as_ref()
                    .map_or_else(|| "-".into(), |v| v.to_string()),
                m.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    crate::output::table(
        &[
            "PHASE", "DEVICE", "HARDWARE", "OFFERED", "OUTCOME", "RUNNING", "ERROR",
        ],
        &rows,
    )
}

/// "rollout 5", "rollouts 5 and 7", or "a newer rollout" when the server
/// did not say which.
fn newer_rollouts(shares: &[uplift_proto::api::RolloutShare]) -> String {
    let ids: Vec<String> = shares.iter().map(|s| s.rollout_id.to_string()).collect();
    match ids.as_slice() {
        [] => "a newer rollout".to_owned(),
        [one] => format!("rollout {one}"),
        [rest @ .., last] => format!("rollouts {} and {last}", rest.join(", ")),
    }
}

/// `rollout status` fails only for a finished rollout with failed devices;
/// a running or superseded one is not a failure of this command.
fn rollout_exit_code(r: &RolloutView) -> i32 {
    let paused = r.progress.as_ref().is_some_and(|p| p.state == "paused");
    if paused || (r.counts.failed > 0 && r.status == RolloutStatus::Finished) {
        1
    } else {
        0
    }
}

async fn rollout(cmd: RolloutCommand) -> anyhow::Result<i32> {
    match cmd {
        RolloutCommand::Start {
            release,
            devices,
            tags,
            tags_match,
            from_versions,
            allow_downgrade,
            max_bytes_per_sec,
            max_downloading,
            policy,
            dry_run,
            json,
            server,
        } => {
            let policy = policy.into_policy()?;
            let request = RolloutCreate {
                release,
                devices,
                tags: match (tags.is_empty(), tags_match) {
                    (true, _) => None,
                    (false, TagsMatch::Any) => Some(TagSelector::Any(tags)),
                    (false, TagsMatch::All) => Some(TagSelector::All(tags)),
                },
                from_versions,
                allow_downgrade,
                limits: DownloadLimits {
                    max_bytes_per_sec,
                    max_downloading,
                },
                policy,
            };
            let client = server.client()?;
            if dry_run {
                let preview = client.preview_rollout(&request).await?;
                print_as(json, &preview, preview_text)?;
                return Ok(0);
            }
            let view = client.start_rollout(&request).await?;
            if json {
                print_json(&view)?;
            } else {
                println!("{}", rollout_line(&view));
                println!("watch it with: uplift rollout status {} --watch", view.id);
            }
            Ok(0)
        }
        RolloutCommand::Pause(target) => command_rollout(target, RolloutCommandName::Pause).await,
        RolloutCommand::Resume(target) => command_rollout(target, RolloutCommandName::Resume).await,
        RolloutCommand::Approve(target) => {
            command_rollout(target, RolloutCommandName::Approve).await
        }
        RolloutCommand::Abort(target) => command_rollout(target, RolloutCommandName::Abort).await,
        RolloutCommand::Retry(target) => command_rollout(target, RolloutCommandName::Retry).await,
        RolloutCommand::Devices(target) => {
            let members = target.server.client()?.rollout_members(target.id).await?;
            print_as(target.json, &members, |m| members_table(m))?;
            Ok(0)
        }
        RolloutCommand::Status {
            id,
            watch: follow,
            json,
            server,
        } => {
            let client = server.client()?;
            let id = match id {
                Some(id) => id,
                None => client
                    .rollouts()
                    .await?
                    .last()
                    .map(|r| r.id)
                    .context("no rollout has been started yet")?,
            };
            let mut view = client.rollout(id).await?;
            if follow && !json {
                view = crate::watch::watch(&client, id, view).await?;
            }
            if json {
                print_json(&view)?;
            } else {
                println!("{}", rollout_line(&view));
                if view.counts.failed > 0 {
                    println!("see why with: uplift devices list");
                }
            }
            Ok(rollout_exit_code(&view))
        }
        RolloutCommand::List { json, server } => {
            let views = server.client()?.rollouts().await?;
            if json {
                print_json(&views)?;
            } else {
                for view in &views {
                    println!("{}", rollout_line(view));
                }
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod rollout_output_tests {
    use super::*;
    use crate::watch::waits_for_reboot_window;
    use uplift_proto::api::RolloutCounts;

    fn view(status: RolloutStatus, counts: RolloutCounts, superseded: u64) -> RolloutView {
        RolloutView {
            id: 3,
            release: "1.1".parse().unwrap(),
            device_type: "gw".parse().unwrap(),
            allow_downgrade: false,
            created_at: "2025-01-01T00:00:00Z".into(),
            devices_total: counts.pending
                + counts.in_progress
                + counts.succeeded
                + counts.failed
                + superseded,
            counts,
            status,
            superseded,
            limits: Default::default(),
            waiting_for_turn: 0,
            progress: None,
            superseded_by: Vec::new(),
            supersedes: Vec::new(),
            tags: None,
            from_versions: Vec::new(),
        }
    }

    #[test]
    fn a_superseded_rollout_says_so_and_does_not_fail_the_command() {
        let r = view(RolloutStatus::Superseded, RolloutCounts::default(), 20);
        assert_eq!(
            rollout_line(&r),
            "rollout 3 of 1.1 (gw): superseded — all 20 devices moved to a newer rollout"
        );
        assert_eq!(rollout_exit_code(&r), 0);
    }

    #[test]
    fn both_rollouts_of_a_supersession_name_each_other() {
        use uplift_proto::api::RolloutShare;
        let mut older = view(RolloutStatus::Superseded, RolloutCounts::default(), 2);
        older.superseded_by = vec![RolloutShare {
            rollout_id: 4,
            devices: 2,
        }];
        assert_eq!(
            rollout_line(&older),
            "rollout 3 of 1.1 (gw): superseded — all 2 devices moved to rollout 4"
        );
        let counts = RolloutCounts {
            pending: 3,
            ..Default::default()
        };
        let mut newer = view(RolloutStatus::Running, counts, 0);
        newer.supersedes = vec![
            RolloutShare {
                rollout_id: 1,
                devices: 1,
            },
            RolloutShare {
                rollout_id: 2,
                devices: 2,
            },
        ];
        assert_eq!(
            rollout_line(&newer),
            "rollout 3 of 1.1 (gw): running — 0 succeeded, 0 in progress, 3 pending, 0 failed of 3 devices; \
             took over 1 device from rollout 1, 2 devices from rollout 2"
        );
        older.status = RolloutStatus::Finished;
        older.superseded_by.push(RolloutShare {
            rollout_id: 7,
            devices: 1,
        });
        assert!(rollout_line(&older).ends_with("(2 moved to rollouts 4 and 7)"));
    }

    #[test]
    fn a_partly_superseded_rollout_shows_how_many_moved() {
        let counts = RolloutCounts {
            succeeded: 15,
            failed: 1,
            ..Default::default()
        };
        let r = view(RolloutStatus::Finished, counts, 4);
        assert_eq!(
            rollout_line(&r),
            "rollout 3 of 1.1 (gw): finished — 15 succeeded, 0 in progress, 0 pending, 1 failed \
             of 20 devices (4 moved to a newer rollout)"
        );
        assert_eq!(
            rollout_exit_code(&r),
            1,
            "a failed device fails the command"
        );
    }

    #[test]
    fn a_running_rollout_counts_its_devices() {
        let counts = RolloutCounts {
            pending: 1,
            in_progress: 2,
            succeeded: 3,
            failed: 1,
            awaiting_reboot: 0,
        };
        let r = view(RolloutStatus::Running, counts, 0);
        assert_eq!(
            rollout_line(&r),
            "rollout 3 of 1.1 (gw): running — 3 succeeded, 2 in progress, 1 pending, 1 failed of 7 devices"
        );
        assert_eq!(rollout_exit_code(&r), 0, "not finished yet");
        assert!(!waits_for_reboot_window(&r));
    }

    #[test]
    fn devices_awaiting_their_reboot_window_are_counted_and_end_a_follow() {
        let counts = RolloutCounts {
            in_progress: 2,
            succeeded: 1,
            awaiting_reboot: 2,
            ..Default::default()
        };
        let r = view(RolloutStatus::Running, counts, 0);
        assert_eq!(
            rollout_line(&r),
            "rollout 3 of 1.1 (gw): running — 1 succeeded, 2 in progress (2 awaiting their reboot \
             window), 0 pending, 0 failed of 3 devices"
        );
        assert!(
            waits_for_reboot_window(&r),
            "nothing happens before the window opens"
        );
        let downloading = RolloutCounts {
            in_progress: 3,
            ..counts
        };
        assert!(!waits_for_reboot_window(&view(
            RolloutStatus::Running,
            downloading,
            0
        )));
    }
}

#[cfg(test)]
mod fleet_output_tests {
    use super::*;
    use uplift_proto::api::{DeviceTypeCount, StateCount, VersionCount};

    #[test]
    fn the_fleet_reads_as_totals_then_a_table_each_for_versions_states_and_types() {
        let summary = FleetSummary {
            devices_total: 12,
            online: 9,
            failing: 1,
            rolled_back: 0,
            in_rollout: 3,
            by_version: vec![
                VersionCount {
                    version: Some("1.1".parse().unwrap()),
                    devices: 10,
                    online: 9,
                },
                VersionCount {
                    version: None,
                    devices: 2,
                    online: 0,
                },
            ],
            by_state: vec![
                StateCount {
                    state: Some(AgentState::Idle),
                    devices: 9,
                },
                StateCount {
                    state: None,
                    devices: 2,
                },
                StateCount {
                    state: Some(AgentState::Failed),
                    devices: 1,
                },
            ],
            by_device_type: vec![DeviceTypeCount {
                device_type: "gw".parse().unwrap(),
                devices: 12,
                online: 9,
            }],
        };
        assert_eq!(
            fleet_text(&summary),
            "12 devices, 9 online: 1 failing, 0 rolled back, 3 in a rollout\n\
             \n\
             VERSION             DEVICES  ONLINE\n\
             1.1                 10       9\n\
             - (never reported)  2        0\n\
             \n\
             STATE               DEVICES\n\
             idle                9\n\
             - (never reported)  2\n\
             failed              1\n\
             \n\
             TYPE  DEVICES  ONLINE\n\
             gw    12       9"
        );
    }

    #[test]
    fn a_preview_says_nothing_was_started_and_lists_its_warnings() {
        let preview = RolloutPreview {
            release: "1.1".parse().unwrap(),
            device_type: "gw".parse().unwrap(),
            devices_total: 20,
            phase_sizes: vec![1, 0, 19],
            warnings: vec!["3 of the 20 devices are offline now".into()],
        };
        assert_eq!(
            preview_text(&preview),
            "would start a rollout of 1.1 (gw) to 20 devices; devices per phase: 1 / 0 / 19\n\
             nothing was started (a start puts other devices in each phase, the same number)\n\
             warning: 3 of the 20 devices are offline now"
        );
    }
}
