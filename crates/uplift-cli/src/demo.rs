//! `uplift demo`: the whole method end to end on one machine. A real server
//! and N real agents (one process each, under the boot simulator) start on
//! version 1.0; release 1.1 is built, signed, uploaded and rolled out; every
//! device downloads it, installs it into slot B, reboots (simulated), passes
//! its health check and commits. The summary is checked against the devices'
//! own boot environments, not just against what the server believes.

use crate::fleet::{
    write_changed_image, write_image, Binaries, Device, DeviceSpec, Proxy, ServerProcess,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use uplift_proto::api::ServerEndpoint;
use uplift_proto::api::{RolloutCreate, RolloutStatus};
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
    listen: String,
    counts: FaultCounts,
    /// Devices killed and when to power them on again.
    down: Vec<(usize, Instant)>,
    max_kills: u32,
    /// Bytes the server had sent before each restart (its counters restart too).
    bytes_before_restarts: u64,
}

impl Chaos {
    /// One tick: maybe inject one fault; power on devices whose time came.
    async fn tick(
        &mut self,
        devices: &mut [Device],
        server: &mut ServerProcess,
        bins: &Binaries,
        client: &crate::client::AdminClient,
        in_progress: u64,
    ) -> anyhow::Result<()> {
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
            self.bytes_before_restarts += client.stats().await.map(|s| s.bytes_sent).unwrap_or(0);
            server.kill();
            *server = ServerProcess::start_on(bins, &server.dir.clone(), &self.listen)?;
            self.counts.server_restarts += 1;
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
        Ok(())
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

const DEVICE_TYPE: &str = "demo-gateway";
const CHAOS_LINK_BYTES_PER_SECOND: u64 = 1024 * 1024;

fn say(json: bool, line: &str) {
    if !json {
        eprintln!("{line}");
    }
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoSummary> {
    anyhow::ensure!(opts.devices > 0, "--devices must be at least 1");
    let bins = Binaries::locate()?;
    let temp;
    let work = match &opts.workdir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("uplift-demo-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let from: Version = "1.0".parse().expect("valid");
    let to: Version = "1.1".parse().expect("valid");

    say(
        opts.json,
        &format!(
            "uplift demo: {} devices, working in {}",
            opts.devices,
            work.display()
        ),
    );
    let server_dir = work.join("server");
    let server_bins = bins.clone();
    let mut server =
        tokio::task::spawn_blocking(move || ServerProcess::start(&server_bins, &server_dir))
            .await??;
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
    let images = work.join("images");
    std::fs::create_dir_all(&images)?;
    let image_from = images.join("os-1.0.img");
    let image_to = images.join("os-1.1.img");
    write_image(&image_from, opts.image_size, 1)?;
    write_changed_image(&image_from, &image_to, 24, 2)?;

    let spec = |i: usize| DeviceSpec {
        device_type: DEVICE_TYPE.into(),
        hardware_id: format!("demo-hw-{i:05}"),
        factory_version: from.to_string(),
        enrollment_token: server.enrollment_token.clone(),
        trusted_keys: vec![key.public_key().to_string()],
        health_check: vec!["true".into()],
        trial_boot_attempts: 3,
        extra_config: String::new(),
        watchdog: None,
    };
    let mut chaos = if opts.chaos {
        let listen = server
            .endpoint
            .url
            .trim_start_matches("https://")
            .to_owned();
        let proxy = Proxy::start(listen.parse()?).await?;
        // Slow links keep downloads in flight long enough to be interrupted.
        proxy.set_rate(CHAOS_LINK_BYTES_PER_SECOND);
        Some(Chaos {
            rng: rand::rngs::StdRng::from_entropy(),
            proxy,
            listen,
            counts: FaultCounts::default(),
            down: Vec::new(),
            max_kills: (opts.devices as u32 / 3).max(3),
            bytes_before_restarts: 0,
        })
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
    let mut devices = Vec::with_capacity(opts.devices);
    for i in 0..opts.devices {
        let mut device = Device::provision(
            &work.join(format!("devices/{i:05}")),
            &spec(i),
            &device_endpoint,
            &image_from,
        )?;
        device.start(&bins)?;
        devices.push(device);
    }
    wait_for_enrollment(&client, opts.devices, &from, &mut devices, opts.timeout).await?;
    say(
        opts.json,
        &format!(
            "  {} devices enrolled, each running {from} from slot a",
            opts.devices
        ),
    );

    let release_dir = work.join("releases/1.1");
    let summary = create_release(
        &image_to,
        &release_dir,
        &ReleaseOptions::new(to.clone(), DEVICE_TYPE.parse()?),
        &key,
    )?;
    let (view, uploaded) = client.upload_release(&release_dir, |_| {}).await?;
    say(
        opts.json,
        &format!(
            "  release {to}: {:.1} MiB image in {} chunks ({:.1} MiB compressed), signed by key {}; uploaded {uploaded} chunks",
            summary.image_size as f64 / 1048576.0,
            view.chunks,
            view.stored_bytes as f64 / 1048576.0,
            key.public_key().key_id()
        ),
    );

    let started = Instant::now();
    let rollout = client
        .start_rollout(&RolloutCreate {
            release: to.clone(),
            devices: None,
            allow_downgrade: false,
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
    let deadline = Instant::now() + opts.timeout;
    let mut in_progress = 0u64;
    let status = loop {
        if let Some(chaos) = chaos.as_mut() {
            chaos
                .tick(&mut devices, &mut server, &bins, &client, in_progress)
                .await?;
        }
        let status = match client.rollout(rollout.id).await {
            Ok(status) => status,
            // The server may be down for a moment while chaos restarts it.
            Err(_) if chaos.is_some() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        in_progress = status.counts.in_progress;
        bar.set_position(status.counts.succeeded);
        bar.set_message(format!(
            "({} in progress, {} pending, {} failed)",
            status.counts.in_progress, status.counts.pending, status.counts.failed
        ));
        if status.status != RolloutStatus::Running || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(chaos) = chaos.as_mut() {
        // Devices still powered off come back and must end up upgraded too.
        chaos.revive_all(&mut devices, &bins)?;
        let settle = Instant::now() + opts.timeout;
        while Instant::now() < settle {
            let views = client.devices().await.unwrap_or_default();
            let done = views.iter().filter(|v| {
                v.online
                    && v.running_version.as_ref() == Some(&to)
                    && v.state == Some(AgentState::Idle)
            });
            if done.count() == opts.devices {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if status.status == RolloutStatus::Running {
        say(
            opts.json,
            &format!(
                "  rollout did not finish within {}s",
                opts.timeout.as_secs()
            ),
        );
    }

    // Trust but verify: each device's own boot environment must say slot b.
    let views = client.devices().await?;
    let mut failures = Vec::new();
    let mut upgraded = 0;
    for device in &devices {
        let id = device.device_id().unwrap_or_default();
        let view = views.iter().find(|v| v.id.as_str() == id);
        let env = device.boot_state();
        let on_new = view.is_some_and(|v| {
            v.running_version.as_ref() == Some(&to) && v.state == Some(AgentState::Idle)
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
            failures.push(format!("{id} ({}): {why}", device.dir.display()));
        }
    }
    let stats = client.stats().await?;
    for mut device in devices {
        device.stop();
    }
    let mut server = server;
    server.stop();
    Ok(DemoSummary {
        devices: opts.devices,
        upgraded,
        failed: opts.devices - upgraded,
        from_version: from.to_string(),
        to_version: to.to_string(),
        seconds,
        bytes_sent: stats.bytes_sent + chaos.as_ref().map_or(0, |c| c.bytes_before_restarts),
        image_size: opts.image_size,
        failures,
        faults: chaos.map(|c| c.counts),
    })
}

async fn wait_for_enrollment(
    client: &crate::client::AdminClient,
    count: usize,
    version: &Version,
    devices: &mut [Device],
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let views = client.devices().await?;
        let ready = views
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
            anyhow::bail!(
                "only {ready} of {count} devices enrolled within {}s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
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
        }
    }
}

fn counted(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}
