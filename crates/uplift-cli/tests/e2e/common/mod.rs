//! Shared set-up for the end-to-end tests: a real server in a temp dir,
//! release images, a release key, and helpers to provision devices and wait
//! (with a bound) for what an operator would see.

#![allow(dead_code)]

pub mod netns;
pub mod tampering;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uplift_client::AdminClient;
use uplift_fleet::{
    write_changed_image, write_image, Binaries, Device, DeviceSpec, ServerLaunch, ServerProcess,
};
use uplift_proto::api::{DeviceView, DownloadLimits, RolloutCreate, RolloutView};
use uplift_proto::{DeviceId, Version};
use uplift_release::build::{create_release, ReleaseOptions};
use uplift_release::keys::ReleaseSigningKey;

pub const DEVICE_TYPE: &str = "test-gateway";
pub const IMAGE_SIZE: u64 = 2 * 1024 * 1024;
/// Upper bound for anything the tests wait for; a healthy run needs a fraction.
pub const WAIT: Duration = Duration::from_secs(90);

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub bins: Binaries,
    pub server: ServerProcess,
    pub client: AdminClient,
    pub key: ReleaseSigningKey,
    /// The factory image every device starts with (version 1.0).
    pub image_v1_0: PathBuf,
    /// A changed image for version 1.1.
    pub image_v1_1: PathBuf,
}

pub fn v(s: &str) -> Version {
    s.parse().expect("valid version")
}

impl Fixture {
    pub fn start() -> Self {
        Self::start_with(ServerLaunch::on("127.0.0.1:0"))
    }

    /// A fixture whose server is started as `launch` says (a config, say).
    pub fn start_with(launch: ServerLaunch) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("uplift-e2e-")
            .tempdir()
            .expect("temp dir");
        let bins = Binaries::locate().expect("binaries (run `cargo build --bins` first)");
        let server = ServerProcess::launch(&bins, &dir.path().join("server"), &launch)
            .expect("server starts");
        let client = server.client().expect("admin client");
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let image_v1_0 = images.join("os-1.0.img");
        let image_v1_1 = images.join("os-1.1.img");
        write_image(&image_v1_0, IMAGE_SIZE, 10).unwrap();
        write_changed_image(&image_v1_0, &image_v1_1, 8, 11).unwrap();
        Self {
            dir,
            bins,
            server,
            client,
            key: ReleaseSigningKey::from_seed([7; 32]),
            image_v1_0,
            image_v1_1,
        }
    }

    /// A fixture for a test on a network of its own: its server listens on
    /// `addr` (an address of the namespace the calling thread is in), its
    /// certificate naming `addr` and `names`, `config` added to its
    /// configuration; images 1.0 and 1.1 of `image_bytes`, unrelated to
    /// each other. Also the launch, to start the server again.
    pub async fn start_at(
        addr: &str,
        names: &[&str],
        config: &str,
        image_bytes: u64,
    ) -> (Self, ServerLaunch) {
        let dir = tempfile::Builder::new()
            .prefix("uplift-net-")
            .tempdir()
            .expect("temp dir");
        let bins = Binaries::locate().expect("binaries (run `cargo build --bins` first)");
        let hostnames: Vec<&str> = std::iter::once(addr).chain(names.iter().copied()).collect();
        let launch = ServerLaunch {
            listen: format!("{addr}:0"),
            config_toml: Some(format!("[tls]\nhostnames = {hostnames:?}\n{config}")),
            netns: None,
        };
        let server = ServerProcess::launch_async(&bins, &dir.path().join("server"), launch.clone())
            .await
            .expect("server starts");
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let image = |version: &str, seed: u64| {
            let path = images.join(format!("os-{version}.img"));
            write_image(&path, image_bytes, seed).unwrap();
            path
        };
        let fx = Self {
            client: server.client().expect("admin client"),
            image_v1_0: image("1.0", 1),
            image_v1_1: image("1.1", 2),
            dir,
            bins,
            server,
            key: ReleaseSigningKey::from_seed([7; 32]),
        };
        (fx, launch)
    }

    /// [`Fixture::start_with`] off the async threads (it waits for the
    /// server blocking).
    pub async fn start_async(launch: ServerLaunch) -> Self {
        tokio::task::spawn_blocking(move || Self::start_with(launch))
            .await
            .expect("the fixture starts")
    }

    /// Another replica of this fixture's server, in `self.path(name)`, with
    /// `config` (the same database as the first). It shares the first
    /// one's TLS identity, tokens and download-token keys: devices trust
    /// one CA, the admin and enrollment tokens work on either, and either
    /// replica checks the other's download tokens.
    pub async fn start_replica(&self, name: &str, config: &str) -> ServerProcess {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        for file in [
            "tls",
            "admin-token",
            "enrollment-token",
            "download-token-keys",
        ] {
            let from = self.server.dir.join(file);
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg(&from)
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "copying {}", from.display());
        }
        let bins = self.bins.clone();
        let launch = ServerLaunch {
            config_toml: Some(config.to_owned()),
            ..ServerLaunch::on("127.0.0.1:0")
        };
        tokio::task::spawn_blocking(move || ServerProcess::launch(&bins, &dir, &launch))
            .await
            .unwrap()
            .expect("another replica starts on the same database")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn spec(&self, hardware_id: &str) -> DeviceSpec {
        DeviceSpec {
            device_type: DEVICE_TYPE.into(),
            hardware_id: hardware_id.into(),
            factory_version: "1.0".into(),
            enrollment_token: self.server.enrollment_token.clone(),
            trusted_keys: vec![self.key.public_key().to_string()],
            health_check: vec!["true".into()],
            trial_boot_attempts: 3,
            extra_config: String::new(),
            watchdog: None,
        }
    }

    /// A spec for device `name` whose service fails on the new OS: its
    /// health check passes on slot a only, so a trial boot of slot b rolls
    /// back with "service fails on the new OS".
    pub fn spec_failing_on_slot_b(&self, name: &str) -> DeviceSpec {
        self.failing_on_slot_b(name, "")
    }

    /// Like [`Fixture::spec_failing_on_slot_b`], but only while `trigger`
    /// exists (without it the device is healthy on either slot): a test can
    /// choose which devices fail after it has started them, e.g. once the
    /// server has put each device in a phase.
    pub fn spec_failing_on_slot_b_when(&self, name: &str, trigger: &Path) -> DeviceSpec {
        self.failing_on_slot_b(name, &format!("! test -e {} || ", trigger.display()))
    }

    /// `healthy_if` is a shell condition ending in `||` that, when true,
    /// passes the health check on either slot.
    fn failing_on_slot_b(&self, name: &str, healthy_if: &str) -> DeviceSpec {
        let mut spec = self.spec(&format!("hw-{name}"));
        let cmdline = self.path(&format!("devices/{name}/cmdline"));
        spec.health_check = vec![
            "sh".into(),
            "-c".into(),
            format!(
                "{healthy_if}grep -q uplift.slot=a {} || {{ echo 'service fails on the new OS' >&2; exit 3; }}",
                cmdline.display()
            ),
        ];
        spec
    }

    /// Provisions and powers on a device.
    pub fn device(&self, name: &str, spec: DeviceSpec) -> Device {
        self.device_via(name, spec, &self.server.endpoint.url)
    }

    /// Provisions and powers on a device that reaches the server at `url`
    /// (e.g. through a fault-injecting proxy).
    pub fn device_via(&self, name: &str, spec: DeviceSpec, url: &str) -> Device {
        let endpoint = uplift_proto::api::ServerEndpoint {
            url: url.to_owned(),
            ..self.server.endpoint.clone()
        };
        let mut device = self.provisioned(name, &spec, &endpoint);
        device.start(&self.bins).expect("start device");
        device
    }

    /// Provisions and powers on a device inside network namespace `netns`.
    pub fn device_in(&self, name: &str, spec: DeviceSpec, netns: &str) -> Device {
        let mut device = self.provisioned(name, &spec, &self.server.endpoint);
        device.netns = Some(netns.to_owned());
        device.start(&self.bins).expect("start device");
        device
    }

    fn provisioned(
        &self,
        name: &str,
        spec: &DeviceSpec,
        endpoint: &uplift_proto::api::ServerEndpoint,
    ) -> Device {
        Device::provision(
            &self.path(&format!("devices/{name}")),
            spec,
            endpoint,
            &self.image_v1_0,
        )
        .expect("provision device")
    }

    /// Provisions and powers on one device per `(name, spec)`, reaching the
    /// server at `url`, off the async threads (each copies the factory
    /// image; a fleet of them would stall the runtime).
    pub async fn power_on(&self, specs: Vec<(String, DeviceSpec)>, url: &str) -> Vec<Device> {
        let endpoint = uplift_proto::api::ServerEndpoint {
            url: url.to_owned(),
            ..self.server.endpoint.clone()
        };
        let specs: Vec<_> = specs
            .into_iter()
            .map(|(name, spec)| (self.path(&format!("devices/{name}")), spec))
            .collect();
        let (bins, image) = (self.bins.clone(), self.image_v1_0.clone());
        tokio::task::spawn_blocking(move || {
            specs
                .into_iter()
                .map(|(dir, spec)| {
                    let mut device = Device::provision(&dir, &spec, &endpoint, &image)
                        .expect("provision device");
                    device.start(&bins).expect("start device");
                    device
                })
                .collect()
        })
        .await
        .unwrap()
    }

    /// Builds a release from `image`, signed by `key`, and uploads it.
    pub async fn release(
        &self,
        version: &str,
        device_type: &str,
        image: &Path,
        key: &ReleaseSigningKey,
    ) -> PathBuf {
        let out = self.path(&format!(
            "releases/{version}-{device_type}-{}",
            key.public_key().key_id()
        ));
        let options = ReleaseOptions::new(v(version), device_type.parse().unwrap());
        create_release(image, &out, &options, key).expect("create release");
        self.client
            .upload_release(&out, |_| {})
            .await
            .expect("upload release");
        out
    }

    pub async fn rollout(&self, version: &str, devices: Option<Vec<DeviceId>>) -> i64 {
        self.rollout_limited(version, devices, Default::default())
            .await
    }

    pub async fn rollout_limited(
        &self,
        version: &str,
        devices: Option<Vec<DeviceId>>,
        limits: DownloadLimits,
    ) -> i64 {
        self.rollout_with(RolloutCreate {
            release: v(version),
            devices,
            tags: None,
            from_versions: Vec::new(),
            allow_downgrade: false,
            limits,
            policy: Default::default(),
        })
        .await
    }

    pub async fn rollout_with(&self, request: RolloutCreate) -> i64 {
        self.client
            .start_rollout(&request)
            .await
            .expect("start rollout")
            .id
    }

    /// Waits until the server's device list satisfies `done`, or fails with
    /// the list and every device log.
    pub async fn wait_for(
        &self,
        what: &str,
        devices: &[&Device],
        done: impl Fn(&[DeviceView]) -> bool,
    ) -> Vec<DeviceView> {
        self.wait_for_within(what, WAIT, devices, done).await
    }

    /// [`Fixture::wait_for`] with another bound than [`WAIT`] (a large
    /// fleet takes longer); `devices` are those whose logs a failure shows.
    pub async fn wait_for_within(
        &self,
        what: &str,
        limit: Duration,
        devices: &[&Device],
        done: impl Fn(&[DeviceView]) -> bool,
    ) -> Vec<DeviceView> {
        let deadline = Instant::now() + limit;
        loop {
            let views = self.client.devices().await.expect("list devices");
            if done(&views) {
                return views;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = devices
                    .iter()
                    .map(|d| format!("--- {}\n{}", d.dir.display(), d.log()))
                    .collect();
                panic!(
                    "timed out waiting for {what}\ndevices: {views:#?}\nserver log:\n{}\n{}",
                    self.server.log_tail(30),
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `device` has enrolled, is connected and idle.
    pub async fn wait_enrolled(&self, device: &Device) -> DeviceView {
        self.wait_device(device, "enrollment", |d| {
            d.online && d.state == Some(uplift_proto::channel::AgentState::Idle)
        })
        .await
    }

    /// Waits until `device` has enrolled and reports `state` on `version`.
    pub async fn wait_device(
        &self,
        device: &Device,
        what: &str,
        done: impl Fn(&DeviceView) -> bool,
    ) -> DeviceView {
        let views = self
            .wait_for(what, &[device], |views| {
                device
                    .device_id()
                    .is_some_and(|id| views.iter().any(|d| d.id.as_str() == id && done(d)))
            })
            .await;
        let id = device.device_id().unwrap();
        views.into_iter().find(|d| d.id.as_str() == id).unwrap()
    }
}

/// `uplift ARGS` run as an operator runs it against the fixture's server
/// (its admin address, CA and token), bounded.
fn run_uplift(fx: &Fixture, args: &[&str]) -> std::process::Output {
    let endpoint = &fx.server.endpoint;
    run_bounded(
        std::process::Command::new(env!("CARGO_BIN_EXE_uplift"))
            .args(args)
            .arg("--server")
            .arg(endpoint.admin_url.as_ref().unwrap_or(&endpoint.url))
            .arg("--ca")
            .arg(&endpoint.ca_file)
            .arg("--token")
            .arg(&fx.server.admin_token),
        Duration::from_secs(60),
        fx.dir.path(),
    )
}

/// `uplift ARGS` against the fixture's server: what it printed, as text.
/// It must succeed.
pub fn uplift(fx: &Fixture, args: &[&str]) -> String {
    let out = run_uplift(fx, args);
    assert!(
        out.status.success(),
        "uplift {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("uplift prints UTF-8")
}

/// Rollout `id` once its engine state is `state`, or as it stands after ten
/// seconds (the scheduler ticks every second; the caller asserts).
pub async fn rollout_reaching(fx: &Fixture, id: i64, state: &str) -> RolloutView {
    let mut view = fx.client.rollout(id).await.expect("rollout view");
    for _ in 0..10 {
        if view.progress.as_ref().is_some_and(|p| p.state == state) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        view = fx.client.rollout(id).await.expect("rollout view");
    }
    view
}

/// `uplift-server check` of the fixture's data directory: exit code and output.
pub fn server_check(fx: &Fixture) -> (Option<i32>, String) {
    let out = std::process::Command::new(&fx.bins.server)
        .arg("check")
        .arg("--data-dir")
        .arg(&fx.server.dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `uplift <args> --json` against the fixture's server, run as an operator
/// runs it (bounded); what it printed, parsed. It must succeed.
pub fn uplift_json<T: serde::de::DeserializeOwned>(fx: &Fixture, args: &[&str]) -> T {
    let (code, parsed) = uplift_json_exit(fx, args);
    assert_eq!(code, 0, "uplift {} exits 0", args.join(" "));
    parsed
}

/// Like [`uplift_json`], for commands whose exit code tells something too
/// (`uplift rollout status` exits 1 for a paused rollout): the exit code
/// and what it printed.
pub fn uplift_json_exit<T: serde::de::DeserializeOwned>(fx: &Fixture, args: &[&str]) -> (i32, T) {
    let out = run_uplift(fx, &[args, &["--json"]].concat());
    let parsed = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "uplift {} --json ({}) printed no JSON ({e}): {}\n--- stderr:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.code().expect("uplift exited, not killed"),
        parsed,
    )
}

/// `uplift rollout <command> <id> --json`, e.g. `abort` or `status`.
pub fn operator(fx: &Fixture, command: &str, id: i64) -> RolloutView {
    uplift_json(fx, &["rollout", command, &id.to_string()])
}

pub fn id_of(device: &Device) -> DeviceId {
    device
        .device_id()
        .expect("device enrolled")
        .parse()
        .unwrap()
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Runs `command` (a whole `uplift` run) to its end, but for at most
/// `limit`: its output goes to files, not pipes, so no process it leaves
/// behind can hold the test open, and on expiry the command's process
/// group and every process naming `workdir` are killed and the test fails
/// with the tails of the logs there, which say where the run stopped.
pub fn run_bounded(
    command: &mut std::process::Command,
    limit: Duration,
    workdir: &Path,
) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let outputs = tempfile::tempdir().expect("a temp dir for the command's output");
    let (out_path, err_path) = (outputs.path().join("stdout"), outputs.path().join("stderr"));
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0)
        .spawn()
        .expect("spawn the command");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the command") {
            break Some(status);
        }
        if started.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read = |p: &Path| std::fs::read(p).unwrap_or_default();
    match status {
        Some(status) => std::process::Output {
            status,
            stdout: read(&out_path),
            stderr: read(&err_path),
        },
        None => {
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            kill_processes_naming(workdir);
            panic!(
                "{command:?} did not finish within {limit:?}\n--- its stderr:\n{}\n{}",
                String::from_utf8_lossy(&read(&err_path)),
                log_tails(workdir, 20)
            );
        }
    }
}

/// SIGKILLs every process whose command line mentions `dir` (the agents and
/// servers a killed run started, which run in process groups of their own).
fn kill_processes_naming(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The last `lines` lines of every `*.log` file under `dir`, each headed by
/// its path.
fn log_tails(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(lines).collect();
                out.push_str(&format!("--- {}:\n", path.display()));
                for line in tail.into_iter().rev() {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// What `uplift-agent status` prints on the device.
pub fn agent_status(device: &Device) -> String {
    let bins = Binaries::locate().unwrap();
    let out = run_bounded(
        std::process::Command::new(bins.agent)
            .arg("--config")
            .arg(device.config_path())
            .arg("status"),
        WAIT,
        &device.dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
