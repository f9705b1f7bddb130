//! `uplift demo`: the whole method end to end on one machine. A real server
//! and N real agents (one process each, under the boot simulator) start on
//! version 1.0; release 1.1 is built, signed, uploaded and rolled out; every
//! device downloads it, installs it into slot B, reboots (simulated), passes
//! its health check and commits. The summary is checked against the devices'
//! own boot environments, not just against what the server believes.

use crate::{
    stop_all, write_changed_image, write_image, Binaries, Device, DeviceSpec, Proxy, ServerLaunch,
    ServerProcess,
};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uplift_client::AdminClient;
use uplift_proto::api::{
    DownloadLimits, RolloutCreate, RolloutStatus, RolloutView, ServerEndpoint, ServerStats,
};
use uplift_proto::channel::AgentState;
use uplift_proto::{SlotName, Version};
use uplift_release::build::{create_release, ReleaseOptions};
use uplift_release::keys::ReleaseSigningKey;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: usize,
    pub image_size: u64,
    pub json: bool,
    /// Keep everything here instead of a temp dir that is removed afterwards.
    pub workdir: Option<PathBuf>,
    pub timeout: Duration,
    /// Inject faults at random during the rollout (see [`Chaos`]).
    pub chaos: bool,
    /// Image of the release rolled out (1.1); generated if `None`.
    pub image: Option<PathBuf>,
    /// Image the devices run at first (1.0); generated if `None`.
    pub factory_image: Option<PathBuf>,
    /// Run across network namespaces the caller made, if given.
    pub netns: Option<DemoNetns>,
    /// Download limits of the demo's rollout.
    pub limits: DownloadLimits,
    /// The server's cap on all downloads together (bytes/s).
    pub server_max_egress: Option<u64>,
}

/// Network namespaces for the demo (the benchmark's emulated link): the
/// server runs in one and listens on an address there; device `i` runs in
/// `{device_prefix}{i}`. The caller makes them, their links and routes,
/// and reaches `server_addr` from its own namespace.
#[derive(Debug, Clone)]
pub struct DemoNetns {
    pub server: String,
    pub server_addr: std::net::IpAddr,
    pub device_prefix: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    pub devices: usize,
    pub upgraded: usize,
    pub failed: usize,
    pub from_version: String,
    pub to_version: String,
    /// From rollout start until every device committed or failed.
    pub seconds: f64,
    /// Manifest and chunk bytes the server sent to devices.
    pub bytes_sent: u64,
    pub image_size: u64,
    pub failures: Vec<String>,
    /// Faults injected with `--chaos`, all survived if `failed` is 0.
    pub faults: Option<FaultCounts>,
    /// The server process's peak resident set size (`VmHWM`), read just
    /// before it was stopped; with `--chaos` the largest over every server
    /// process. `None` if `/proc` could not be read.
    pub server_peak_rss_bytes: Option<u64>,
    /// Device rows the server wrote to its database during the rollout, in
    /// how many write transactions, and rows per second of the rollout.
    pub db_rows_written: u64,
    pub db_write_batches: u64,
    pub db_rows_per_second: f64,
    /// CPU seconds (user + system, from `/proc/<pid>/stat`) the server
    /// process used from its start until just before it was stopped.
    pub server_cpu_seconds: Option<f64>,
    /// Per device, seconds from rollout start until the server first saw it
    /// running the new version (polled every 100 ms), in device order.
    pub device_seconds: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FaultCounts {
    /// Agents killed with SIGKILL (then powered on again).
    pub agent_kills: u32,
    /// Times every device connection was dropped at once.
    pub connection_cuts: u32,
    /// Times the server was killed with SIGKILL and restarted.
    pub server_restarts: u32,
}

impl FaultCounts {
    pub fn total(&self) -> u32 {
        self.agent_kills + self.connection_cuts + self.server_restarts
    }
}

/// Random faults during a rollout, within a fixed budget so the demo always
/// ends: SIGKILL of agents (powered on again shortly after), every TCP
/// connection cut at the proxy, and SIGKILL + restart of the server.
struct Chaos {
    rng: rand::rngs::StdRng,
    proxy: Proxy,
    counts: FaultCounts,
    /// Devices killed and when to power them on again.
    down: Vec<(usize, Instant)>,
    max_kills: u32,
}

impl Chaos {
    /// Chaos for a fleet of `devices` on `server`: a proxy in front of it
    /// whose slow links keep downloads in flight long enough to be
    /// interrupted.
    async fn start(server: &ServerProcess, devices: usize) -> anyhow::Result<Self> {
        let proxy = Proxy::start(server.listen_addr().parse()?).await?;
        proxy.set_rate(CHAOS_LINK_BYTES_PER_SECOND);
        Ok(Chaos {
            rng: rand::rngs::StdRng::from_entropy(),
            proxy,
            counts: FaultCounts::default(),
            down: Vec::new(),
            max_kills: (devices as u32 / 3).max(3),
        })
    }

    /// One tick: maybe inject one fault; power on devices whose time came.
    /// Takes the server and gives back the one now running (a new process
    /// after a restart).
    async fn tick(
        &mut self,
        devices: &mut [Device],
        server: ServerProcess,
        counters: &mut ServerCounters,
        bins: &Binaries,
        client: &AdminClient,
        in_progress: u64,
    ) -> anyhow::Result<ServerProcess> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.down.len() {
            if self.down[i].1 <= now {
                let (index, _) = self.down.swap_remove(i);
                devices[index].start(bins)?;
            } else {
                i += 1;
            }
        }
        // Every kind of fault happens at least once, mid-rollout; agent
        // kills and further cuts come at random.
        if self.counts.connection_cuts == 0 && in_progress > 0 {
            self.proxy.cut_all();
            self.counts.connection_cuts += 1;
        } else if self.counts.server_restarts == 0 && in_progress > 0 {
            // Its counters restart with it: keep what it counted so far.
            // Best effort: a busy server that does not answer in time only
            // makes the totals smaller, never larger.
            if let Ok(Ok(stats)) = tokio::time::timeout(POLL_TIMEOUT, client.stats()).await {
                counters.before_restart(&stats);
            }
            let (restarted, peak) = server.kill_and_restart(bins).await?;
            counters.peak_rss(peak);
            self.counts.server_restarts += 1;
            return Ok(restarted);
        } else if self.counts.agent_kills == 0 && in_progress > 0 {
            self.kill_random_agent(devices, now);
        } else {
            match self.rng.gen_range(0..100) {
                0..=14 if self.counts.agent_kills < self.max_kills => {
                    self.kill_random_agent(devices, now);
                }
                15..=16 if self.counts.connection_cuts < 4 => {
                    self.proxy.cut_all();
                    self.counts.connection_cuts += 1;
                }
                _ => {}
            }
        }
        Ok(server)
    }

    /// SIGKILLs the agent of a random device that is up, to be powered on
    /// again 0.1 to 0.8 s later. A device between two boots has no agent to
    /// kill; the next tick tries again.
    fn kill_random_agent(&mut self, devices: &mut [Device], now: Instant) {
        let index = self.rng.gen_range(0..devices.len());
        if !self.down.iter().any(|(d, _)| *d == index) && devices[index].kill_agent() {
            self.counts.agent_kills += 1;
            let delay = Duration::from_millis(self.rng.gen_range(100..800));
            self.down.push((index, now + delay));
        }
    }

    /// Powers on every device still down.
    fn revive_all(&mut self, devices: &mut [Device], bins: &Binaries) -> anyhow::Result<()> {
        for (index, _) in self.down.drain(..) {
            devices[index].start(bins)?;
        }
        Ok(())
    }
}

/// What the server counted, summed over its restarts (each new process
/// counts from zero), and its peak memory.
#[derive(Debug, Default)]
struct ServerCounters {
    /// Sums of finished server processes.
    bytes_sent: u64,
    rows_written: u64,
    write_batches: u64,
    /// The running process's database counters when the rollout started
    /// (zero for a process started after that).
    rows_at_start: u64,
    batches_at_start: u64,
    peak_rss: Option<u64>,
}

impl ServerCounters {
    fn rollout_started(&mut self, stats: &ServerStats) {
        self.rows_at_start = stats.device_rows_written;
        self.batches_at_start = stats.write_batches;
    }

    fn before_restart(&mut self, stats: &ServerStats) {
        self.bytes_sent += stats.bytes_sent;
        self.rows_written += stats.device_rows_written.saturating_sub(self.rows_at_start);
        self.write_batches += stats.write_batches.saturating_sub(self.batches_at_start);
        self.rows_at_start = 0;
        self.batches_at_start = 0;
    }

    fn peak_rss(&mut self, peak: Option<u64>) {
        self.peak_rss = self.peak_rss.max(peak);
    }

    /// Totals with the running server's `stats` added.
    fn totals(&self, stats: &ServerStats) -> (u64, u64, u64) {
        (
            self.bytes_sent + stats.bytes_sent,
            self.rows_written + stats.device_rows_written.saturating_sub(self.rows_at_start),
            self.write_batches + stats.write_batches.saturating_sub(self.batches_at_start),
        )
    }
}

/// Polls of the server in one phase of the demo. Under load (1000 devices
/// on two cores) or while chaos restarts the server, a poll may fail or
/// time out; the demo waits a moment and asks again until its deadline,
/// and says afterwards how often that happened.
struct Polls {
    what: &'static str,
    total: u64,
    failed: u64,
    last_error: Option<String>,
}

/// One poll of the admin API may take this long before it counts as failed
/// (the client's own timeout is much longer, made for uploads).
const POLL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Wait after a failed poll: short, since the server is usually back at once.
const RETRY_WAIT: Duration = Duration::from_millis(250);

impl Polls {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            total: 0,
            failed: 0,
            last_error: None,
        }
    }

    /// Asks until an answer comes, or fails with the last error once
    /// `deadline` has passed.
    async fn ask<T, Fut>(
        &mut self,
        deadline: Instant,
        mut request: impl FnMut() -> Fut,
    ) -> anyhow::Result<T>
    where
        Fut: Future<Output = anyhow::Result<T>>,
    {
        loop {
            match self.try_once(request()).await {
                Some(answer) => return Ok(answer),
                None if Instant::now() >= deadline => {
                    anyhow::bail!(
                        "the server did not answer {} ({} of {} polls failed; last error: {})",
                        self.what,
                        self.failed,
                        self.total,
                        self.last_error.as_deref().unwrap_or("-")
                    )
                }
                None => tokio::time::sleep(RETRY_WAIT).await,
            }
        }
    }

    /// One poll; a failure is counted and remembered, not returned.
    async fn try_once<T>(&mut self, request: impl Future<Output = anyhow::Result<T>>) -> Option<T> {
        self.total += 1;
        let error = match tokio::time::timeout(POLL_TIMEOUT, request).await {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no answer within {} s", POLL_TIMEOUT.as_secs()),
        };
        self.failed += 1;
        self.last_error = Some(error);
        None
    }

    /// On stderr even with `--json`: the operator should know the server
    /// struggled, whatever the outcome.
    fn report(&self) {
        if self.failed > 0 {
            eprintln!(
                "  warning: {} of {} polls of the server failed {} (last error: {})",
                self.failed,
                self.total,
                self.what,
                self.last_error.as_deref().unwrap_or("-")
            );
        }
    }
}

const DEVICE_TYPE: &str = "demo-gateway";
/// Slow enough that a delta of a few hundred KiB per device keeps the
/// rollout in progress for the faults (at 1 MiB/s a six-device demo could
/// finish between two of its 100 ms polls).
const CHAOS_LINK_BYTES_PER_SECOND: u64 = 256 * 1024;
/// Devices provisioned and powered on by one blocking task. All of them are
/// powered on as fast as that goes, without pacing: measured on two cores
/// (debug build, 1000 devices), the fleet was online in 13.6 s that way and
/// in 24 s with at most 64 devices waiting to enroll at a time (every
/// device enrolled in both), so pacing would only slow the start.
const START_BATCH: usize = 16;
/// How long stopped agents get to shut down cleanly, all together.
const STOP_GRACE: Duration = Duration::from_secs(10);

fn say(json: bool, line: &str) {
    if !json {
        eprintln!("{line}");
    }
}

/// Runs `f` on a blocking thread: file writes, copies, release building.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .with_context(|| format!("{what}: the task panicked"))?
        .with_context(|| what.to_owned())
}

/// The longest a whole demo may take: each of its waits (enrollment, the
/// rollout, the settling after it) is bounded by `timeout`, the final
/// checks by a minute, and set-up by another two.
pub fn whole_run_limit(timeout: Duration) -> Duration {
    timeout * 3 + Duration::from_secs(180)
}

/// Runs the demo, bounded as a whole by [`whole_run_limit`]: every wait
/// inside has its own deadline, but a hang nobody foresaw must still end
/// in an error, not a process that never exits. The servers and devices
/// are stopped as the abandoned run is dropped.
pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoSummary> {
    let limit = whole_run_limit(opts.timeout);
    match tokio::time::timeout(limit, run_unbounded(opts)).await {
        Ok(result) => result,
        Err(_) => anyhow::bail!(
            "the demo did not finish within {} s (three times --timeout, plus set-up); \
             the server and device logs under its work directory say where it stopped",
            limit.as_secs()
        ),
    }
}

async fn run_unbounded(opts: DemoOptions) -> anyhow::Result<DemoSummary> {
    anyhow::ensure!(opts.devices > 0, "--devices must be at least 1");
    let bins = Binaries::locate()?;
    let temp;
    let work = match &opts.workdir {
        Some(dir) => {
            tokio::fs::create_dir_all(dir)
                .await
                .with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("uplift-demo-").tempdir()?;
            temp.path().to_owned()
        }
    };
    say(
        opts.json,
        &format!(
            "uplift demo: {} devices, working in {}",
            opts.devices,
            work.display()
        ),
    );
    anyhow::ensure!(
        !(opts.chaos && opts.netns.is_some()),
        "--chaos restarts the server on loopback; it cannot be combined with network namespaces"
    );
    let server =
        ServerProcess::launch_async(&bins, &work.join("server"), server_launch(&opts)).await?;
    let mut devices = Vec::with_capacity(opts.devices);
    let result = run_fleet(&opts, &bins, &work, server, &mut devices).await;
    // Every device is stopped, on success or error, all at once.
    let count = devices.len();
    let started = Instant::now();
    let killed = blocking("stopping the devices", move || {
        Ok(stop_all(&mut devices, STOP_GRACE))
    })
    .await?;
    say(
        opts.json,
        &format!(
            "  {count} devices stopped in {:.1} s{}",
            started.elapsed().as_secs_f64(),
            if killed > 0 {
                format!(
                    " ({killed} did not stop within {} s and were killed)",
                    STOP_GRACE.as_secs()
                )
            } else {
                String::new()
            }
        ),
    );
    result
}

/// The demo with its server started, step by step; the caller stops
/// `devices` afterwards.
async fn run_fleet(
    opts: &DemoOptions,
    bins: &Binaries,
    work: &Path,
    server: ServerProcess,
    devices: &mut Vec<Device>,
) -> anyhow::Result<DemoSummary> {
    let from: Version = "1.0".parse().expect("valid");
    let to: Version = "1.1".parse().expect("valid");
    let client = server.client()?;
    say(
        opts.json,
        &format!(
            "  server listening on {} (TLS, CA {})",
            server.endpoint.url,
            server.endpoint.ca_file.display()
        ),
    );
    let key = ReleaseSigningKey::generate();
    let images = demo_images(opts, work).await?;
    let mut chaos = if opts.chaos {
        Some(Chaos::start(&server, opts.devices).await?)
    } else {
        None
    };
    let device_endpoint = match &chaos {
        Some(c) => ServerEndpoint {
            url: c.proxy.url(),
            ..server.endpoint.clone()
        },
        None => server.endpoint.clone(),
    };
    let spec = DeviceSpec {
        device_type: DEVICE_TYPE.into(),
        hardware_id: String::new(),
        factory_version: from.to_string(),
        enrollment_token: server.enrollment_token.clone(),
        trusted_keys: vec![key.public_key().to_string()],
        health_check: vec!["true".into()],
        trial_boot_attempts: 3,
        extra_config: String::new(),
        watchdog: None,
    };
    let fleet = Fleet {
        opts,
        bins,
        client: &client,
    };
    fleet
        .enroll(&spec, &device_endpoint, &images.from, work, devices, &from)
        .await?;
    fleet.publish(&key, &images, work, &from, &to).await?;
    let mut counters = ServerCounters::default();
    let followed = fleet
        .follow_rollout(server, &mut chaos, &mut counters, devices, &to)
        .await?;
    fleet
        .verify(
            followed,
            counters,
            devices,
            &from,
            &to,
            chaos.map(|c| c.counts),
        )
        .await
}

/// The demo's two images: the factory image the devices run (1.0) and the
/// release's (1.1), each given or written here.
struct Images {
    from: PathBuf,
    to: PathBuf,
}

/// Writes the images not given, off the async threads.
async fn demo_images(opts: &DemoOptions, work: &Path) -> anyhow::Result<Images> {
    let dir = work.join("images");
    let images = Images {
        from: opts
            .factory_image
            .clone()
            .unwrap_or_else(|| dir.join("os-1.0.img")),
        to: opts.image.clone().unwrap_or_else(|| dir.join("os-1.1.img")),
    };
    let (from, to, size) = (images.from.clone(), images.to.clone(), opts.image_size);
    let (gen_from, gen_to) = (opts.factory_image.is_none(), opts.image.is_none());
    blocking("writing the demo images", move || {
        std::fs::create_dir_all(&dir)?;
        let size = if gen_to {
            size
        } else {
            std::fs::metadata(&to)?.len()
        };
        if gen_from {
            write_image(&from, size, 1)?;
        }
        if gen_to {
            write_changed_image(&from, &to, 24, 2)?;
        }
        Ok(())
    })
    .await?;
    Ok(images)
}

/// The rollout as [`Fleet::follow_rollout`] saw it.
struct Followed {
    /// The server now running (a new process if chaos restarted it).
    server: ServerProcess,
    /// From the rollout's start to its end (or the timeout, or the fleet
    /// settling after chaos).
    seconds: f64,
    /// The rollout's last status read.
    last: Option<RolloutView>,
    /// Per device ID, seconds from the rollout's start to the first poll
    /// that saw it run the new version.
    done_at: std::collections::HashMap<String, f64>,
    polls: Polls,
}

/// What every step of a demo run uses.
struct Fleet<'a> {
    opts: &'a DemoOptions,
    bins: &'a Binaries,
    client: &'a AdminClient,
}

impl Fleet<'_> {
    /// Powers on the fleet and waits until every device runs `from`, idle.
    async fn enroll(
        &self,
        spec: &DeviceSpec,
        endpoint: &ServerEndpoint,
        factory_image: &Path,
        work: &Path,
        devices: &mut Vec<Device>,
        from: &Version,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.opts.timeout;
        let started = Instant::now();
        power_on(
            self.opts,
            spec,
            endpoint,
            factory_image,
            &work.join("devices"),
            self.bins,
            devices,
        )
        .await?;
        let mut enrollment = Polls::new("while devices enrolled");
        let enrolled =
            wait_for_enrollment(self.client, from, devices, deadline, &mut enrollment).await;
        enrollment.report();
        enrolled?;
        say(
            self.opts.json,
            &format!(
                "  {} devices enrolled in {:.1} s, each running {from} from slot a",
                self.opts.devices,
                started.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    /// Builds release `to` (patched against the image the devices run, as
    /// an operator would), signed by `key`, off the async threads, and
    /// uploads it.
    async fn publish(
        &self,
        key: &ReleaseSigningKey,
        images: &Images,
        work: &Path,
        from: &Version,
        to: &Version,
    ) -> anyhow::Result<()> {
        let release_dir = work.join(format!("releases/{to}"));
        let mut options = ReleaseOptions::new(to.clone(), DEVICE_TYPE.parse()?);
        options.delta_from = Some(images.from.clone());
        let (image, dir, signing) = (
            images.to.clone(),
            release_dir.clone(),
            ReleaseSigningKey::from_pkcs8_pem(&key.to_pkcs8_pem())?,
        );
        let summary = blocking("building release 1.1", move || {
            Ok(create_release(&image, &dir, &options, &signing)?)
        })
        .await?;
        let (view, uploaded) = self.client.upload_release(&release_dir, |_| {}).await?;
        say(
            self.opts.json,
            &format!(
                "  release {to}: {:.1} MiB image in {} chunks ({:.1} MiB compressed, {} patched against {from} in {:.1} MiB), \
                 signed by key {}; uploaded {uploaded} chunks and patches",
                summary.image_size as f64 / 1048576.0,
                view.chunks,
                view.stored_bytes as f64 / 1048576.0,
                summary.manifest.patches.len(),
                summary.manifest.patch_bytes() as f64 / 1048576.0,
                key.public_key().key_id()
            ),
        );
        Ok(())
    }

    /// Starts the rollout of `to` to every device and follows it to its
    /// end (or the timeout), injecting faults if `chaos`; then, after
    /// chaos, waits for the fleet to settle on `to`.
    async fn follow_rollout(
        &self,
        mut server: ServerProcess,
        chaos: &mut Option<Chaos>,
        counters: &mut ServerCounters,
        devices: &mut [Device],
        to: &Version,
    ) -> anyhow::Result<Followed> {
        let (opts, client) = (self.opts, self.client);
        let mut polls = Polls::new("during the rollout");
        let deadline = Instant::now() + opts.timeout;
        counters.rollout_started(&polls.ask(deadline, || client.stats()).await?);
        let started = Instant::now();
        let rollout = client
            .start_rollout(&RolloutCreate {
                release: to.clone(),
                devices: None,
                tags: None,
                from_versions: Vec::new(),
                allow_downgrade: false,
                limits: opts.limits,
                policy: Default::default(),
            })
            .await?;
        say(
            opts.json,
            &format!(
                "  rollout {} started: {} devices",
                rollout.id, rollout.devices_total
            ),
        );
        let bar = if opts.json || !std::io::stderr().is_terminal() {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(opts.devices as u64)
        };
        bar.set_style(
            ProgressStyle::with_template("  {bar:40} {pos}/{len} upgraded {msg}")
                .expect("valid template"),
        );
        let mut in_progress = 0u64;
        let mut last: Option<RolloutView> = None;
        let mut done_at: std::collections::HashMap<String, f64> = Default::default();
        loop {
            if let Ok(Ok(views)) = tokio::time::timeout(POLL_TIMEOUT, client.devices()).await {
                let now = started.elapsed().as_secs_f64();
                for v in views {
                    if v.running_version.as_ref() == Some(to) {
                        done_at.entry(v.id.as_str().to_owned()).or_insert(now);
                    }
                }
            }
            if let Some(chaos) = chaos.as_mut() {
                server = chaos
                    .tick(devices, server, counters, self.bins, client, in_progress)
                    .await?;
            }
            if let Some(status) = polls.try_once(client.rollout(rollout.id)).await {
                in_progress = status.counts.in_progress;
                bar.set_position(status.counts.succeeded);
                bar.set_message(format!(
                    "({} in progress, {} pending, {} failed)",
                    status.counts.in_progress, status.counts.pending, status.counts.failed
                ));
                let running = status.status == RolloutStatus::Running;
                last = Some(status);
                if !running {
                    break;
                }
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        if let Some(chaos) = chaos.as_mut() {
            // Devices still powered off come back and must end up upgraded too.
            chaos.revive_all(devices, self.bins)?;
            self.settle(&mut polls, to).await;
        }
        bar.finish_and_clear();
        Ok(Followed {
            server,
            seconds: started.elapsed().as_secs_f64(),
            last,
            done_at,
            polls,
        })
    }

    /// Waits (up to the timeout) until every device is online, idle, on `to`.
    async fn settle(&self, polls: &mut Polls, to: &Version) {
        let settle = Instant::now() + self.opts.timeout;
        while Instant::now() < settle {
            if let Some(views) = polls.try_once(self.client.devices()).await {
                let done = views.iter().filter(|v| {
                    v.online
                        && v.running_version.as_ref() == Some(to)
                        && v.state == Some(AgentState::Idle)
                });
                if done.count() == self.opts.devices {
                    return;
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Trust but verify: a device counts as upgraded only if the server
    /// says it runs `to`, idle, and its own boot environment says slot b,
    /// committed. Stops the server and sums up.
    async fn verify(
        &self,
        followed: Followed,
        mut counters: ServerCounters,
        devices: &mut Vec<Device>,
        from: &Version,
        to: &Version,
        faults: Option<FaultCounts>,
    ) -> anyhow::Result<DemoSummary> {
        let (opts, client) = (self.opts, self.client);
        let Followed {
            server,
            seconds,
            last,
            done_at,
            polls,
        } = followed;
        polls.report();
        if last
            .as_ref()
            .is_none_or(|s| s.status == RolloutStatus::Running)
        {
            say(
                opts.json,
                &format!(
                    "  rollout did not finish within {}s",
                    opts.timeout.as_secs()
                ),
            );
        }
        // The final reads get a deadline of their own: the rollout's may be spent.
        let mut final_polls = Polls::new("for the final check");
        let check_deadline = Instant::now() + Duration::from_secs(60);
        let views = final_polls.ask(check_deadline, || client.devices()).await;
        let stats = final_polls.ask(check_deadline, || client.stats()).await;
        final_polls.report();
        let (views, stats) = (views?, stats?);
        let peak = server.peak_rss();
        if let Err(e) = &peak {
            eprintln!("  warning: cannot read the server's peak RSS: {e:#}");
        }
        counters.peak_rss(peak.ok());
        let server_cpu_seconds = cpu_seconds(server.pid());
        let own = std::mem::take(devices);
        let (own, local) = blocking("reading the devices' boot environments", move || {
            let local: Vec<_> = own
                .iter()
                .map(|d| {
                    (
                        d.device_id().unwrap_or_default(),
                        d.boot_state(),
                        d.dir.clone(),
                    )
                })
                .collect();
            Ok((own, local))
        })
        .await?;
        *devices = own;
        let mut failures = Vec::new();
        let mut upgraded = 0;
        let device_seconds = local
            .iter()
            .map(|(id, _, _)| done_at.get(id.as_str()).copied())
            .collect();
        for (id, env, dir) in local {
            let view = views.iter().find(|v| v.id.as_str() == id);
            let on_new = view.is_some_and(|v| {
                v.running_version.as_ref() == Some(to) && v.state == Some(AgentState::Idle)
            });
            let committed = env
                .as_ref()
                .is_ok_and(|s| s.default_slot == SlotName::B && s.trial.is_none());
            if on_new && committed {
                upgraded += 1;
            } else {
                let why = match view.and_then(|v| v.last_error.as_ref()) {
                    Some(e) => e.to_string(),
                    None => format!(
                        "state {:?}, boot env {:?}",
                        view.and_then(|v| v.state).map(|s| s.as_str()),
                        env.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
                    ),
                };
                failures.push(format!("{id} ({}): {why}", dir.display()));
            }
        }
        server.stop_async().await;
        let (bytes_sent, rows, batches) = counters.totals(&stats);
        Ok(DemoSummary {
            devices: opts.devices,
            upgraded,
            failed: opts.devices - upgraded,
            from_version: from.to_string(),
            to_version: to.to_string(),
            seconds,
            bytes_sent,
            image_size: opts.image_size,
            failures,
            faults,
            server_peak_rss_bytes: counters.peak_rss,
            db_rows_written: rows,
            db_write_batches: batches,
            db_rows_per_second: if seconds > 0.0 {
                rows as f64 / seconds
            } else {
                0.0
            },
            server_cpu_seconds,
            device_seconds,
        })
    }
}

/// How the demo's server starts: on loopback, or in the caller's namespace
/// with a certificate for its address there; with the egress cap asked for.
fn server_launch(opts: &DemoOptions) -> ServerLaunch {
    let mut toml = String::new();
    let listen = match &opts.netns {
        Some(ns) => {
            let addr = ns.server_addr.to_string();
            toml += &format!(
                "[tls]\nhostnames = [{}]\n",
                toml::Value::String(addr.clone())
            );
            std::net::SocketAddr::new(ns.server_addr, 0).to_string()
        }
        None => "127.0.0.1:0".to_owned(),
    };
    if let Some(cap) = opts.server_max_egress {
        toml += &format!("[limits]\nmax_egress_bytes_per_sec = {cap}\n");
    }
    ServerLaunch {
        listen,
        config_toml: (!toml.is_empty()).then_some(toml),
        netns: opts.netns.as_ref().map(|ns| ns.server.clone()),
    }
}

/// utime + stime of a live process, in seconds (`/proc/<pid>/stat`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ: 100 on every Linux architecture we ship to.
    Some((utime + stime) as f64 / 100.0)
}

/// Provisions and powers on `count` devices, [`START_BATCH`] at a time on a
/// blocking thread (each copies the factory image and spawns a process).
async fn power_on(
    opts: &DemoOptions,
    spec: &DeviceSpec,
    endpoint: &ServerEndpoint,
    factory_image: &Path,
    dir: &Path,
    bins: &Binaries,
    devices: &mut Vec<Device>,
) -> anyhow::Result<()> {
    let count = opts.devices;
    let prefix = opts.netns.as_ref().map(|ns| ns.device_prefix.clone());
    while devices.len() < count {
        let first = devices.len();
        let batch = START_BATCH.min(count - first);
        let (spec, endpoint, image, dir, bins, prefix) = (
            spec.clone(),
            endpoint.clone(),
            factory_image.to_owned(),
            dir.to_owned(),
            bins.clone(),
            prefix.clone(),
        );
        let started = blocking("provisioning devices", move || {
            (first..first + batch)
                .map(|i| {
                    let spec = DeviceSpec {
                        hardware_id: format!("demo-hw-{i:05}"),
                        ..spec.clone()
                    };
                    let mut device =
                        Device::provision(&dir.join(format!("{i:05}")), &spec, &endpoint, &image)?;
                    device.netns = prefix.as_ref().map(|p| format!("{p}{i}"));
                    device.start(&bins)?;
                    Ok(device)
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await?;
        devices.extend(started);
    }
    Ok(())
}

async fn wait_for_enrollment(
    client: &AdminClient,
    version: &Version,
    devices: &mut [Device],
    deadline: Instant,
    polls: &mut Polls,
) -> anyhow::Result<()> {
    let count = devices.len();
    let mut ready = 0;
    loop {
        if let Some(views) = polls.try_once(client.devices()).await {
            ready = views
                .iter()
                .filter(|v| {
                    v.online
                        && v.running_version.as_ref() == Some(version)
                        && v.state == Some(AgentState::Idle)
                })
                .count();
            if ready == count {
                return Ok(());
            }
        }
        for device in devices.iter_mut() {
            if let Some(status) = device.exited() {
                anyhow::bail!(
                    "device in {} stopped ({status}):\n{}",
                    device.dir.display(),
                    device.log()
                );
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("only {ready} of {count} devices enrolled within the timeout");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

impl DemoSummary {
    pub fn line(&self) -> String {
        format!(
            "{}/{} devices upgraded {} -> {} in {:.1} s ({:.1} MiB sent by the server for {:.1} MiB of images)",
            self.upgraded,
            self.devices,
            self.from_version,
            self.to_version,
            self.seconds,
            self.bytes_sent as f64 / 1048576.0,
            (self.image_size * self.devices as u64) as f64 / 1048576.0,
        ) + &match self.faults {
            Some(f) => format!(
                "; survived {} ({}, {}, {})",
                counted(f.total(), "injected fault", "injected faults"),
                counted(f.agent_kills, "agent SIGKILL", "agent SIGKILLs"),
                counted(f.connection_cuts, "connection cut", "connection cuts"),
                counted(
                    f.server_restarts,
                    "server SIGKILL and restart",
                    "server SIGKILLs and restarts"
                ),
            ),
            None => String::new(),
        } + &format!(
            "; server peak RSS {}, {} in {} ({:.1} rows/s)",
            self.server_peak_rss_bytes
                .map_or("unknown".to_owned(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
            counted(self.db_rows_written, "device row written", "device rows written"),
            counted(self.db_write_batches, "database write", "database writes"),
            self.db_rows_per_second,
        )
    }
}

fn counted(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(faults: Option<FaultCounts>) -> DemoSummary {
        DemoSummary {
            devices: 50,
            upgraded: 50,
            failed: 0,
            from_version: "1.0".into(),
            to_version: "1.1".into(),
            seconds: 2.14,
            bytes_sent: 83 * 1048576 + 209715,
            image_size: 8 * 1048576,
            failures: Vec::new(),
            faults,
            server_peak_rss_bytes: Some(90 * 1048576 + 314573),
            db_rows_written: 400,
            db_write_batches: 12,
            db_rows_per_second: 186.9,
            server_cpu_seconds: None,
            device_seconds: Vec::new(),
        }
    }

    #[test]
    fn the_summary_line_keeps_its_format_and_adds_the_server_figures() {
        assert_eq!(
            summary(None).line(),
            "50/50 devices upgraded 1.0 -> 1.1 in 2.1 s (83.2 MiB sent by the server for 400.0 MiB of images); \
             server peak RSS 90.3 MiB, 400 device rows written in 12 database writes (186.9 rows/s)"
        );
        let faults = FaultCounts {
            agent_kills: 4,
            connection_cuts: 1,
            server_restarts: 1,
        };
        assert_eq!(
            summary(Some(faults)).line(),
            "50/50 devices upgraded 1.0 -> 1.1 in 2.1 s (83.2 MiB sent by the server for 400.0 MiB of images); \
             survived 6 injected faults (4 agent SIGKILLs, 1 connection cut, 1 server SIGKILL and restart); \
             server peak RSS 90.3 MiB, 400 device rows written in 12 database writes (186.9 rows/s)"
        );
    }

    #[test]
    fn server_counters_add_up_over_a_restart() {
        let stats = |rows, batches, bytes| ServerStats {
            device_rows_written: rows,
            write_batches: batches,
            bytes_sent: bytes,
            ..Default::default()
        };
        let mut c = ServerCounters::default();
        // 50 rows were written at enrollment, before the rollout.
        c.rollout_started(&stats(50, 5, 0));
        c.before_restart(&stats(80, 8, 1000));
        c.peak_rss(Some(10));
        c.peak_rss(None);
        c.peak_rss(Some(7));
        assert_eq!(c.totals(&stats(20, 2, 500)), (1500, 50, 5));
        assert_eq!(c.peak_rss, Some(10));
    }

    #[tokio::test]
    async fn a_failed_poll_is_retried_until_it_answers_and_counted() {
        let mut polls = Polls::new("in a test");
        let mut calls = 0;
        let answer = polls
            .ask(Instant::now() + Duration::from_secs(5), || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        anyhow::bail!("500 internal error {n}")
                    }
                    Ok(n)
                }
            })
            .await
            .unwrap();
        assert_eq!((answer, polls.failed, polls.total), (3, 2, 3));
        assert_eq!(polls.last_error.as_deref(), Some("500 internal error 2"));

        let err = polls
            .ask(Instant::now(), || async {
                anyhow::bail!("down") as anyhow::Result<()>
            })
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("3 of 4 polls failed; last error: down"),
            "{err}"
        );
    }
}
