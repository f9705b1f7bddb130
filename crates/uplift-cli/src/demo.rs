//! `uplift demo`: the whole method end to end on one machine. A real server
//! and N real agents (one process each, under the boot simulator) start on
//! version 1.0; release 1.1 is built, signed, uploaded and rolled out; every
//! device downloads it, installs it into slot B, reboots (simulated), passes
//! its health check and commits. The summary is checked against the devices'
//! own boot environments, not just against what the server believes.

use crate::fleet::{write_changed_image, write_image, Binaries, Device, DeviceSpec, ServerProcess};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use uplift_proto::api::RolloutCreate;
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
}

const DEVICE_TYPE: &str = "demo-gateway";

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
    let server =
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
        trial_boot_attempts: 1,
        extra_config: String::new(),
    };
    let mut devices = Vec::with_capacity(opts.devices);
    for i in 0..opts.devices {
        let mut device = Device::provision(
            &work.join(format!("devices/{i:05}")),
            &spec(i),
            &server.endpoint,
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
    let status = loop {
        let status = client.rollout(rollout.id).await?;
        bar.set_position(status.counts.succeeded);
        bar.set_message(format!(
            "({} in progress, {} pending, {} failed)",
            status.counts.in_progress, status.counts.pending, status.counts.failed
        ));
        if status.status == "finished" || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if status.status != "finished" {
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
        bytes_sent: stats.bytes_sent,
        image_size: opts.image_size,
        failures,
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
        )
    }
}
