//! A fleet on one machine: the real `uplift-server` and, per device, the real
//! `uplift-agent` under `uplift-boot-sim`, each a separate process with its
//! own slot files, boot environment and state directory in a temp dir. The
//! demo and the end-to-end tests both use it; dropping a handle kills its
//! process, so nothing outlives a test.
//!
//! Everything here is blocking (process waits, file copies) unless its name
//! ends in `_async`; async callers run the rest on blocking threads.
//!
//! It lives beside the simulator, not in the operator's CLI: `uplift demo`
//! is a thin call into [`demo::run`], and nothing an operator runs against a
//! real server needs the harness.

pub mod demo;

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use uplift_bootenv::file::BootEnvFile;
use uplift_bootenv::state::BootState;
use uplift_client::AdminClient;
use uplift_proto::api::ServerEndpoint;
use uplift_proto::SlotName;

/// The three programs a fleet runs, found beside the running executable
/// (`target/<profile>/`) or in `$UPLIFT_BIN_DIR`; `$UPLIFT_AGENT_BIN` names
/// another agent build (say, `target/device/uplift-agent`).
#[derive(Debug, Clone)]
pub struct Binaries {
    pub server: PathBuf,
    pub agent: PathBuf,
    pub boot_sim: PathBuf,
}

impl Binaries {
    pub fn locate() -> anyhow::Result<Self> {
        let mut dirs = Vec::new();
        if let Some(dir) = std::env::var_os("UPLIFT_BIN_DIR") {
            dirs.push(PathBuf::from(dir));
        }
        let exe = std::env::current_exe().context("locating the running executable")?;
        for dir in exe.ancestors().skip(1).take(2) {
            dirs.push(dir.to_owned());
        }
        for dir in &dirs {
            let bins = Self {
                server: dir.join("uplift-server"),
                agent: dir.join("uplift-agent"),
                boot_sim: dir.join("uplift-boot-sim"),
            };
            if bins.server.is_file() && bins.agent.is_file() && bins.boot_sim.is_file() {
                return match std::env::var_os("UPLIFT_AGENT_BIN").map(PathBuf::from) {
                    Some(agent) if agent.is_file() => Ok(Self { agent, ..bins }),
                    Some(agent) => anyhow::bail!(
                        "UPLIFT_AGENT_BIN names {}, which is not a file; build it first \
                         (`cargo build --profile device -p uplift-agent`)",
                        agent.display()
                    ),
                    None => Ok(bins),
                };
            }
        }
        anyhow::bail!(
            "uplift-server, uplift-agent and uplift-boot-sim were not found in {dirs:?}; build them first with \
             `cargo build --bins` (add --release for a release build) or set UPLIFT_BIN_DIR"
        )
    }
}

fn log_file(path: &Path) -> anyhow::Result<(File, File)> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log {}", path.display()))?;
    Ok((out.try_clone()?, out))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn signal(child: &Child, sig: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// SIGTERM, then SIGKILL if the process has not gone within `grace`.
fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal(child, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// `VmHWM` (peak resident set size) from the text of `/proc/<pid>/status`, in bytes.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut words = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    // The kernel always says kB (meaning KiB) here.
    (words.next()? == "kB").then_some(value * 1024)
}

/// Stops many devices at once: SIGTERM to every one, then a single shared
/// grace period in which they shut down in parallel, then SIGKILL for any
/// left. Stopping them one after the other would cost up to `grace` each.
/// Blocking (it polls with short sleeps): call it from a blocking thread.
/// Returns how many had to be killed.
pub fn stop_all(devices: &mut [Device], grace: Duration) -> usize {
    let mut running: Vec<Child> = devices.iter_mut().filter_map(|d| d.child.take()).collect();
    for child in &running {
        signal(child, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while !running.is_empty() && Instant::now() < deadline {
        running.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        if !running.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let killed = running.len();
    for child in &mut running {
        let _ = child.kill();
    }
    for child in &mut running {
        let _ = child.wait();
    }
    killed
}

/// A running `uplift-server` with its generated tokens and CA.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    pub dir: PathBuf,
    pub endpoint: ServerEndpoint,
    pub admin_token: String,
    pub enrollment_token: String,
    pub log: PathBuf,
}

impl ServerProcess {
    /// Starts a server on a free loopback port with its data in `dir`.
    pub fn start(bins: &Binaries, dir: &Path) -> anyhow::Result<Self> {
        Self::start_on(bins, dir, "127.0.0.1:0")
    }

    pub fn start_on(bins: &Binaries, dir: &Path, listen: &str) -> anyhow::Result<Self> {
        Self::launch(bins, dir, &ServerLaunch::on(listen))
    }

    /// Starts a server as `launch` says, with its data in `dir`.
    pub fn launch(bins: &Binaries, dir: &Path, launch: &ServerLaunch) -> anyhow::Result<Self> {
        let listen = launch.listen.as_str();
        std::fs::create_dir_all(dir)?;
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = dir.join("server.log");
        let (out, err) = log_file(&log)?;
        let mut command = in_netns(launch.netns.as_deref(), &bins.server);
        if let Some(toml) = &launch.config_toml {
            let path = dir.join("server.toml");
            let data_dir = toml::Value::String(dir.display().to_string());
            std::fs::write(&path, format!("data_dir = {data_dir}\n{toml}"))
                .with_context(|| format!("writing {}", path.display()))?;
            command.arg("--config").arg(path);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(dir)
            .arg("--listen")
            .arg(listen)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bins.server.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoint: ServerEndpoint = loop {
            if let Ok(bytes) = std::fs::read(&ready) {
                break serde_json::from_slice(&bytes).context("reading the server's ready file")?;
            }
            if let Ok(Some(status)) = child.try_wait() {
                anyhow::bail!(
                    "uplift-server exited with {status} before listening:\n{}",
                    tail(&log, 20)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                anyhow::bail!(
                    "uplift-server did not start within 30 s:\n{}",
                    tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let read_token = |path: &Option<PathBuf>| -> anyhow::Result<String> {
            let path = path
                .as_ref()
                .context("the server did not generate this token")?;
            Ok(std::fs::read_to_string(path)?.trim().to_owned())
        };
        let admin_token = read_token(&endpoint.admin_token_file)?;
        let enrollment_token = read_token(&endpoint.enrollment_token_file)?;
        Ok(Self {
            child,
            dir: dir.to_owned(),
            endpoint,
            admin_token,
            enrollment_token,
            log,
        })
    }

    /// [`Self::start_on`] on a blocking thread: it polls for the ready file
    /// with sleeps, which must not stall an async runtime.
    pub async fn start_on_async(bins: &Binaries, dir: &Path, listen: &str) -> anyhow::Result<Self> {
        Self::launch_async(bins, dir, ServerLaunch::on(listen)).await
    }

    /// [`Self::launch`] on a blocking thread.
    pub async fn launch_async(
        bins: &Binaries,
        dir: &Path,
        launch: ServerLaunch,
    ) -> anyhow::Result<Self> {
        let (bins, dir) = (bins.clone(), dir.to_owned());
        tokio::task::spawn_blocking(move || Self::launch(&bins, &dir, &launch))
            .await
            .context("the task starting uplift-server panicked")?
    }

    /// SIGKILLs the server and starts a new one on the same address and
    /// data, off the async threads. Returns the new server and the killed
    /// one's peak RSS (read just before the kill; `None` if unreadable).
    pub async fn kill_and_restart(
        mut self,
        bins: &Binaries,
    ) -> anyhow::Result<(Self, Option<u64>)> {
        let listen = self.listen_addr().to_owned();
        let bins = bins.clone();
        tokio::task::spawn_blocking(move || {
            let peak = self.peak_rss().ok();
            self.kill();
            let dir = self.dir.clone();
            drop(self);
            Ok((Self::start_on(&bins, &dir, &listen)?, peak))
        })
        .await
        .context("the task restarting uplift-server panicked")?
    }

    /// `host:port` the server listens on.
    pub fn listen_addr(&self) -> &str {
        self.endpoint.url.trim_start_matches("https://")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server process's peak resident set size in bytes (`VmHWM` in
    /// `/proc/<pid>/status`); only while the process has not been reaped.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_vm_hwm(&status).with_context(|| format!("no VmHWM line in {path}"))
    }

    pub fn client(&self) -> anyhow::Result<AdminClient> {
        AdminClient::new(
            &self.endpoint.url,
            &self.endpoint.ca_file,
            &self.admin_token,
        )
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    pub fn stop(&mut self) -> Option<ExitStatus> {
        stop_child(&mut self.child, Duration::from_secs(10))
    }

    /// [`Self::stop`] on a blocking thread (it waits up to 10 s).
    pub async fn stop_async(mut self) -> Option<ExitStatus> {
        tokio::task::spawn_blocking(move || self.stop())
            .await
            .ok()
            .flatten()
    }

    /// SIGKILL: the server gets no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to set up one simulated device.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub device_type: String,
    pub hardware_id: String,
    pub factory_version: String,
    pub enrollment_token: String,
    /// `ed25519:<base64>` release keys the agent trusts.
    pub trusted_keys: Vec<String>,
    pub health_check: Vec<String>,
    pub trial_boot_attempts: u32,
    /// Extra TOML appended to the agent config (e.g. a `[hooks]` table).
    pub extra_config: String,
    /// The simulated hardware watchdog (`uplift-boot-sim --watchdog-secs`).
    pub watchdog: Option<Duration>,
}

/// One simulated device: its files, and its boot simulator + agent process.
#[derive(Debug)]
pub struct Device {
    pub dir: PathBuf,
    /// Slots a and b: files in `dir`, or what [`Device::provision_on`] was given.
    slots: [PathBuf; 2],
    watchdog: Option<Duration>,
    child: Option<Child>,
    /// The network namespace its processes run in, if not the caller's.
    pub netns: Option<String>,
}

/// Where and how a server process starts.
#[derive(Debug, Clone, Default)]
pub struct ServerLaunch {
    /// `host:port`; port 0 picks a free one.
    pub listen: String,
    /// Settings written to `<dir>/server.toml` (`data_dir` is added).
    pub config_toml: Option<String>,
    /// A network namespace to run in (`ip netns exec`), made by the caller.
    pub netns: Option<String>,
}

impl ServerLaunch {
    pub fn on(listen: &str) -> Self {
        Self {
            listen: listen.to_owned(),
            ..Self::default()
        }
    }
}

/// A command for `program`, inside network namespace `netns` if given.
/// `ip netns exec` execs the program, so the child's PID is the program's.
fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// The agent's config file as a simulated device gets it (the agent's own
/// `AgentConfig` reads it, with unknown keys refused, so a field renamed
/// there fails every test at once).
#[derive(Serialize)]
struct AgentConfigFile<'a> {
    server_url: &'a str,
    server_ca: &'a Path,
    enrollment_token: &'a str,
    device_type: &'a str,
    hardware_id: &'a str,
    state_dir: &'a Path,
    trusted_release_keys: &'a [String],
    factory_version: &'a str,
    health_check: &'a [String],
    trial_boot_attempts: u32,
    slots: SlotsFile<'a>,
    boot: BootFile<'a>,
    reboot: RebootFile,
}

#[derive(Serialize)]
struct SlotsFile<'a> {
    a: &'a Path,
    b: &'a Path,
}

#[derive(Serialize)]
struct BootFile<'a> {
    env_file: &'a Path,
    cmdline: &'a Path,
}

#[derive(Serialize)]
struct RebootFile {
    mode: &'static str,
}

impl AgentConfigFile<'_> {
    /// The TOML text, with the tables of `extra` (a test's `[download]` or
    /// `[hooks]`) added; a key given in both is `extra`'s.
    fn to_toml(&self, extra: &str) -> anyhow::Result<String> {
        let mut table = toml::Table::try_from(self).context("encoding the agent config")?;
        let extra: toml::Table = toml::from_str(extra)
            .with_context(|| format!("the extra agent config is not TOML: {extra:?}"))?;
        merge(&mut table, extra);
        toml::to_string(&table).context("encoding the agent config")
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(mine)), toml::Value::Table(theirs)) => merge(mine, theirs),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

impl Device {
    /// Lays out a factory-fresh device: `factory_image` in slot A (booted and
    /// committed), an empty slot B, a GRUB environment and an agent config.
    pub fn provision(
        dir: &Path,
        spec: &DeviceSpec,
        server: &ServerEndpoint,
        factory_image: &Path,
    ) -> anyhow::Result<Self> {
        let slots = [dir.join("slot-a.img"), dir.join("slot-b.img")];
        std::fs::create_dir_all(dir)?;
        std::fs::copy(factory_image, &slots[0])
            .with_context(|| format!("copying the factory image into {}", dir.display()))?;
        File::create(&slots[1])?;
        Self::provision_on(dir, spec, server, slots)
    }

    /// Lays out a device whose slots are `slots` (block devices, say),
    /// prepared by the caller: slot a holds the factory image. Slot a is
    /// booted and committed.
    pub fn provision_on(
        dir: &Path,
        spec: &DeviceSpec,
        server: &ServerEndpoint,
        slots: [PathBuf; 2],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("state"))?;
        let device = Self {
            dir: dir.to_owned(),
            slots,
            watchdog: spec.watchdog,
            netns: None,
            child: None,
        };
        BootEnvFile::provision(device.bootenv_path(), SlotName::A)?;
        let config = AgentConfigFile {
            server_url: &server.url,
            server_ca: &server.ca_file,
            enrollment_token: &spec.enrollment_token,
            device_type: &spec.device_type,
            hardware_id: &spec.hardware_id,
            state_dir: &dir.join("state"),
            trusted_release_keys: &spec.trusted_keys,
            factory_version: &spec.factory_version,
            health_check: &spec.health_check,
            trial_boot_attempts: spec.trial_boot_attempts,
            slots: SlotsFile {
                a: &device.slot_path(SlotName::A),
                b: &device.slot_path(SlotName::B),
            },
            boot: BootFile {
                env_file: &device.bootenv_path(),
                cmdline: &device.cmdline_path(),
            },
            reboot: RebootFile { mode: "exit" },
        }
        .to_toml(&spec.extra_config)?;
        std::fs::write(device.config_path(), config)?;
        Ok(device)
    }

    pub fn slot_path(&self, slot: SlotName) -> PathBuf {
        match slot {
            SlotName::A => self.slots[0].clone(),
            SlotName::B => self.slots[1].clone(),
        }
    }
    pub fn bootenv_path(&self) -> PathBuf {
        self.dir.join("grubenv")
    }
    pub fn cmdline_path(&self) -> PathBuf {
        self.dir.join("cmdline")
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("device.log")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The ID the server assigned, once the agent has enrolled.
    pub fn device_id(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("state/device-id"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    pub fn boot_state(&self) -> anyhow::Result<BootState> {
        Ok(BootEnvFile::new(self.bootenv_path()).load_state()?.1)
    }

    /// Powers the device on: the boot simulator picks a slot and starts the agent.
    pub fn start(&mut self, bins: &Binaries) -> anyhow::Result<()> {
        let (out, err) = log_file(&self.log_path())?;
        let mut sim = in_netns(self.netns.as_deref(), &bins.boot_sim);
        if let Some(watchdog) = self.watchdog {
            sim.arg("--watchdog-secs")
                .arg(watchdog.as_secs_f64().to_string());
        }
        let child = sim
            .arg("--bootenv")
            .arg(self.bootenv_path())
            .arg("--cmdline")
            .arg(self.cmdline_path())
            .arg("--slot-a")
            .arg(self.slot_path(SlotName::A))
            .arg("--slot-b")
            .arg(self.slot_path(SlotName::B))
            .arg("--")
            .arg(&bins.agent)
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bins.boot_sim.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// The exit status if the device's processes have ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the device's processes to end by themselves.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.child
            .take()
            .and_then(|mut c| stop_child(&mut c, Duration::from_secs(10)))
    }

    /// SIGKILLs the agent process itself (a crash, or power lost while it
    /// worked); the boot simulator then powers the device off. Returns false
    /// if no agent was running at that moment, or the one signalled was
    /// already leaving for a reboot (the device stays up).
    pub fn kill_agent(&mut self) -> bool {
        let Some(sim) = self.child.as_mut() else {
            return false;
        };
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", sim.id()))
            .unwrap_or_default();
        let mut signalled = false;
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            signalled |= kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok();
        }
        // An agent already exiting to reboot takes the signal too, and the
        // simulator then boots the next one instead of powering off: that
        // was no kill, and waiting for the simulator would wait forever.
        if signalled && self.wait_exit(KILLED_AGENT_POWER_OFF).is_some() {
            self.child = None;
            return true;
        }
        false
    }
}

/// How long the boot simulator may take to power off once its agent is
/// killed (milliseconds, on an idle machine).
const KILLED_AGENT_POWER_OFF: Duration = Duration::from_secs(5);

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(2));
        }
    }
}

/// Writes a pseudo-random "OS image" of `size` bytes: random blocks with runs
/// of zeros between them, so it compresses somewhat, like a real root fs.
pub fn write_image(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = std::io::BufWriter::new(
        File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut block = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    while written < size {
        let n = block.len().min((size - written) as usize);
        if rng.next_u32() % 4 == 0 {
            block[..n].fill(0);
        } else {
            rng.fill_bytes(&mut block[..n]);
        }
        out.write_all(&block[..n])?;
        written += n as u64;
    }
    out.flush()?;
    Ok(())
}

/// Writes an image the simulated kernel cannot boot (see
/// `uplift_sim::KERNEL_PANIC_MARKER`): a release that never reaches user space.
pub fn write_unbootable_image(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    write_image(path, size, seed)?;
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(uplift_sim::KERNEL_PANIC_MARKER)?;
    Ok(())
}

/// Writes a new version of `base`: the same size, with `changes` small
/// regions rewritten at random places (what an OS update mostly looks like).
pub fn write_changed_image(
    base: &Path,
    path: &Path,
    changes: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let mut data = std::fs::read(base).with_context(|| format!("reading {}", base.display()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..changes {
        let len = 4096.min(data.len());
        let at = (rng.next_u64() % (data.len() - len + 1) as u64) as usize;
        rng.fill_bytes(&mut data[at..at + len]);
    }
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A TCP proxy on loopback between devices and the server, for injecting
/// network faults for real: throttle the download direction, or cut every
/// open connection at once. TLS passes through untouched.
#[derive(Debug)]
pub struct Proxy {
    addr: std::net::SocketAddr,
    control: std::sync::Arc<ProxyControl>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct ProxyControl {
    /// Bytes per second per connection towards the device; 0 = unlimited.
    rate: std::sync::atomic::AtomicU64,
    cut: tokio::sync::watch::Sender<u64>,
    /// While set, the network is down: new connections are dropped at once.
    down: std::sync::atomic::AtomicBool,
    /// Bytes carried towards devices: what they really received.
    delivered: std::sync::atomic::AtomicU64,
}

impl Proxy {
    pub async fn start(upstream: std::net::SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let control = std::sync::Arc::new(ProxyControl {
            rate: std::sync::atomic::AtomicU64::new(0),
            cut: tokio::sync::watch::channel(0).0,
            down: std::sync::atomic::AtomicBool::new(false),
            delivered: std::sync::atomic::AtomicU64::new(0),
        });
        let shared = control.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let control = shared.clone();
                if control.down.load(std::sync::atomic::Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let mut cut = control.cut.subscribe();
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pipe(client_read, server_write, None) => {}
                        _ = pipe(server_read, client_write, Some((&control.rate, &control.delivered))) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            control,
            task,
        })
    }

    /// `https://` URL of the proxy, to give devices as their server.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn set_rate(&self, bytes_per_second: u64) {
        self.control
            .rate
            .store(bytes_per_second, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes carried from the server towards devices so far (TLS included).
    pub fn delivered(&self) -> u64 {
        self.control
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops every open connection (new ones are still accepted).
    pub fn cut_all(&self) {
        self.control.cut.send_modify(|n| *n += 1);
    }

    /// Takes the network down (every connection cut, new ones refused) or
    /// brings it back.
    pub fn set_down(&self, down: bool) {
        self.control
            .down
            .store(down, std::sync::atomic::Ordering::Relaxed);
        if down {
            self.cut_all();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    towards_device: Option<(&std::sync::atomic::AtomicU64, &std::sync::atomic::AtomicU64)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        let Some((rate, delivered)) = towards_device else {
            continue;
        };
        delivered.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        let limit = rate.load(std::sync::atomic::Ordering::Relaxed);
        if limit > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / limit as f64)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_config_is_valid_toml_with_odd_paths_and_the_extra_tables_merged() {
        let odd = Path::new("/tmp/a \"quoted\" dir/ca.pem");
        let keys = vec!["ed25519:abc".to_owned()];
        let health = vec!["/bin/true".to_owned(), "--flag".to_owned()];
        let config = AgentConfigFile {
            server_url: "https://127.0.0.1:7443",
            server_ca: odd,
            enrollment_token: "tok",
            device_type: "gw",
            hardware_id: "hw-1",
            state_dir: Path::new("/tmp/state"),
            trusted_release_keys: &keys,
            factory_version: "1.0",
            health_check: &health,
            trial_boot_attempts: 3,
            slots: SlotsFile {
                a: Path::new("/tmp/a.img"),
                b: Path::new("/tmp/b.img"),
            },
            boot: BootFile {
                env_file: Path::new("/tmp/grubenv"),
                cmdline: Path::new("/tmp/cmdline"),
            },
            reboot: RebootFile { mode: "exit" },
        };
        let text = config
            .to_toml("[download]\nmax_bytes_per_sec = 1000\n[reboot]\nmode = \"command\"\n")
            .unwrap();
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            parsed["server_ca"].as_str(),
            Some("/tmp/a \"quoted\" dir/ca.pem")
        );
        assert_eq!(parsed["health_check"].as_array().unwrap().len(), 2);
        assert_eq!(
            parsed["download"]["max_bytes_per_sec"].as_integer(),
            Some(1000)
        );
        assert_eq!(
            parsed["reboot"]["mode"].as_str(),
            Some("command"),
            "extra wins"
        );
        assert_eq!(parsed["slots"]["b"].as_str(), Some("/tmp/b.img"));
        assert!(
            config.to_toml("[download").is_err(),
            "broken extra TOML is an error"
        );
    }

    #[test]
    fn peak_rss_is_read_from_vm_hwm_in_kib() {
        let status = "Name:\tuplift-server\nVmPeak:\t  900000 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(51200 * 1024));
        assert_eq!(parse_vm_hwm("Name:\tx\nVmRSS:\t 1 kB\n"), None);
    }

    #[test]
    fn peak_rss_of_this_process_is_plausible() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let peak = parse_vm_hwm(&status).expect("Linux reports VmHWM");
        assert!(peak > 1024 * 1024, "{peak}");
    }

    #[test]
    fn stop_all_stops_every_process_within_one_grace_period() {
        // Processes that ignore SIGTERM: each must be killed, and all of
        // them within one grace period, not one each.
        let mut devices: Vec<Device> = (0..8)
            .map(|i| Device {
                dir: PathBuf::from(format!("/nonexistent/{i}")),
                slots: [
                    PathBuf::from("/nonexistent/a"),
                    PathBuf::from("/nonexistent/b"),
                ],
                watchdog: None,
                netns: None,
                child: Some(
                    Command::new("sh")
                        .args(["-c", "trap '' TERM; exec sleep 30"])
                        .spawn()
                        .unwrap(),
                ),
            })
            .collect();
        // Give the shells time to install their trap.
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let killed = stop_all(&mut devices, Duration::from_millis(500));
        assert_eq!(killed, 8);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(devices.iter().all(|d| d.child.is_none()));
    }
}
