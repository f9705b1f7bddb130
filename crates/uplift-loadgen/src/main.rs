//! `uplift-loadgen`: opens N real device sessions from one process to a
//! running `uplift-server` and measures what the server does with them.
//!
//! Each session is what an agent's channel is: TCP (bound to its own
//! loopback source address, so ephemeral ports do not run out), TLS trusting
//! only the server's CA, the WebSocket channel, enrollment with the
//! enrollment token (or, when the device ID is known, a key proof over the
//! server's nonce), a first report, then silence but for the WebSocket's
//! pongs, as an idle agent's. An offer is answered by a report (the device
//! says it is downloading) and its arrival time recorded; nothing is
//! downloaded. A dropped session reconnects with the agent's own backoff.
//!
//! Phases, each bounded, the whole run within `--duration`:
//! 1. connect all N: time and rate;
//! 2. settle, then the server's resident memory per session (ΔRSS / N);
//! 3. with `--release V`: start a rollout of V through the admin API and
//!    time each session's offer from that instant (p50, p99, max);
//! 4. with `--hold S`: keep the sessions idle S seconds (for checks from
//!    outside);
//! 5. with `--storm`: wait for the server to be killed and restarted (by
//!    whoever runs this: `bench/sessions` does), then time how long until
//!    every session is back and the peak rate of new sessions; with
//!    `--storm-kill-file`, one replica of several is killed instead (by
//!    `bench/replicas`), and the storm runs from the kill until every
//!    session that dropped is back on another.
//!
//! Several generators share one rollout (`bench/replicas` runs them, each
//! under its own 20 000 open files): each writes `--connected-file` once
//! its sessions are up, one more (`--sessions 0 --release V`) starts the
//! rollout and writes its start (wall clock) to `--rollout-file`, where the
//! others read it to time their offers; `--samples` writes each one's raw
//! figures (offer latencies, drops and returns as UNIX milliseconds), so
//! percentiles and rates are computed over all sessions. A generator with
//! `--sessions 0 --probe-admin S` times the admin API's answers meanwhile,
//! and with `--probe-downloads V` a download's too: a device of its own,
//! enrolled through the device URL, fetches release V's manifest and first
//! chunk with its download token.

use anyhow::Context;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::Parser;
use ed25519_dalek::{Signer, SigningKey};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use uplift_agent::net::{self, ChannelOptions};
use uplift_loadgen::measure::{self, Latencies, ProcSample, WallClock};
use uplift_loadgen::{raise_open_files, wait_until};
use uplift_proto::api::ServerEndpoint;
use uplift_proto::channel::{
    self, AgentMsg, AgentState, Report, ServerMsg, FEATURES, MAX_FRAME_BYTES,
};
use uplift_proto::{DeviceId, DeviceType, ErrorKind, HardwareId, SlotName, Version};

#[derive(Debug, Parser)]
#[command(
    name = "uplift-loadgen",
    version,
    about = "Opens N real device sessions to an uplift-server and measures it"
)]
struct Args {
    /// The server's ready file (`uplift-server --ready-file`): URL, CA and token files.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Device URL (instead of, or overriding, the ready file's).
    #[arg(long)]
    server: Option<String>,
    /// The server's CA certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Enrollment token (else read from the ready file's token file).
    #[arg(long, env = "UPLIFT_ENROLLMENT_TOKEN", hide_env_values = true)]
    enrollment_token: Option<String>,
    /// Admin API token, to start the rollout and read stats.
    #[arg(long, env = "UPLIFT_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Sessions to open.
    #[arg(long, short = 'n', default_value_t = 1000)]
    sessions: usize,
    /// Hard bound on the whole run, in seconds; the generator exits by then.
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Handshakes (TCP, TLS, WebSocket, authentication) in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds to wait once all are connected before measuring memory.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Start a rollout of this release (already uploaded) and time the offers.
    #[arg(long)]
    release: Option<Version>,
    /// Seconds to keep the sessions idle after the rollout phase.
    #[arg(long, default_value_t = 0)]
    hold: u64,
    /// Wait for the server to be restarted and time the reconnect storm.
    #[arg(long)]
    storm: bool,
    /// With --storm: created once the generator waits for the restart.
    #[arg(long)]
    storm_ready_file: Option<PathBuf>,
    /// The server's process ID, for its memory and CPU time (else found by
    /// name when exactly one `uplift-server` runs).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Device type the sessions enroll as.
    #[arg(long, default_value = "loadgen")]
    device_type: DeviceType,
    /// Version the sessions report running.
    #[arg(long, default_value = "1.0")]
    running_version: Version,
    /// Names this generator's devices: keys and hardware IDs derive from it,
    /// so generators with different names are different devices, and the
    /// same name enrolls the same devices again (the server gives their IDs back).
    #[arg(long, default_value = "lg")]
    name: String,
    /// Session i binds its socket to the i/PER_ADDRESS-th address of
    /// 127.1.0.0/16 (only when the server is on loopback).
    #[arg(long, default_value_t = 64)]
    per_address: usize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Several generators, one rollout. With `--release`: once the rollout
    /// is started, write its ID and start time (wall clock) to FILE. Without:
    /// wait for FILE (written by the generator that starts the rollout) and
    /// time this generator's offers from the start written in it.
    #[arg(long)]
    rollout_file: Option<PathBuf>,
    /// Created once every session is up (or the connect phase gave up), so
    /// whoever runs several generators knows when to start the rollout.
    #[arg(long)]
    connected_file: Option<PathBuf>,
    /// With --storm: one replica of several is killed rather than the only
    /// server restarted. FILE appears once it was killed and holds the kill's
    /// wall-clock time (UNIX milliseconds); the storm is timed from then
    /// until every session that dropped is back (wherever it lands).
    #[arg(long)]
    storm_kill_file: Option<PathBuf>,
    /// After the rollout phase, ask the admin API for its stats every
    /// --probe-interval-ms for this many seconds and time every answer (the
    /// API's responsiveness, during a reconnect storm for instance).
    #[arg(long, default_value_t = 0)]
    probe_admin: u64,
    /// Milliseconds between two admin API probes (one at a time: a slow
    /// answer delays the next).
    #[arg(long, default_value_t = 100)]
    probe_interval_ms: u64,
    /// With --probe-admin: also download, through the device URL, this
    /// release's manifest and first chunk at each probe, as a device of its
    /// own (enrolled first, of type `<device type>-probe` so that it joins
    /// no rollout of the fleet's) with its download token.
    #[arg(long)]
    probe_downloads: Option<Version>,
    /// Stop probing the admin API once FILE exists (before --probe-admin
    /// seconds have passed).
    #[arg(long)]
    probe_until_file: Option<PathBuf>,
    /// Seconds to keep the sessions up after the last phase (and the
    /// samples written), for checks from outside, before closing them.
    #[arg(long, default_value_t = 0)]
    linger: u64,
    /// Stop lingering once FILE exists.
    #[arg(long)]
    linger_until_file: Option<PathBuf>,
    /// Write the raw samples (offer latencies, storm drops and returns,
    /// admin probes; times as UNIX milliseconds) as JSON to FILE, for
    /// figures over several generators.
    #[arg(long)]
    samples: Option<PathBuf>,
}

/// The agent's silence limit: the server pings every 20 s.
const SILENCE_LIMIT: Duration = Duration::from_secs(75);
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// With a replica killed, how long its sessions may take to notice: the
/// kernel closes the dead process's sockets at once, and the balancer
/// passes the close on.
const KILL_NOTICE: Duration = Duration::from_secs(10);
/// With a replica killed, the storm is over once every session that
/// dropped is back and none dropped for this long.
const STORM_QUIET: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => {}
        Err(e) => {
            eprintln!("uplift-loadgen: {e:#}");
            std::process::exit(1);
        }
    }
}

/// What every session shares with the measuring side.
#[derive(Debug)]
struct Shared {
    online: AtomicUsize,
    /// Instants of every welcome (a session up), in arrival order.
    welcomes: Mutex<Vec<Instant>>,
    /// Instants sessions went down (after having been up).
    drops: Mutex<Vec<Instant>>,
    /// Per session: when its first offer arrived, with the rollout.
    offers: Mutex<Vec<Option<(Instant, i64)>>>,
    enrolled: AtomicUsize,
    fatal: Mutex<Vec<String>>,
    retries: AtomicUsize,
    last_error: Mutex<Option<String>>,
    /// Offers before this flag are not timed (a rollout that existed before).
    timing_offers: AtomicBool,
    /// Set when the generator waits for the server's restart: from then on
    /// each session counts its drop, and its return.
    storm_armed: AtomicBool,
    storm_dropped: AtomicUsize,
    storm_back: AtomicUsize,
}

#[derive(Debug, Clone)]
struct Setup {
    url: reqwest::Url,
    tls: Arc<rustls::ClientConfig>,
    token: String,
    device_type: DeviceType,
    running_version: Version,
    name: String,
    bind: bool,
    per_address: usize,
}

async fn run(args: Args) -> anyhow::Result<()> {
    raise_open_files();
    let endpoint: Option<ServerEndpoint> = match &args.ready_file {
        Some(path) => Some(
            serde_json::from_slice(
                &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("parsing {}", path.display()))?,
        ),
        None => None,
    };
    let url_text = args
        .server
        .clone()
        .or_else(|| endpoint.as_ref().map(|e| e.url.clone()))
        .context("give --server URL or --ready-file")?;
    let url: reqwest::Url = url_text.parse().context("parsing the server URL")?;
    let admin_url: reqwest::Url = endpoint
        .as_ref()
        .and_then(|e| e.admin_url.clone())
        .map_or(Ok(url.clone()), |u| u.parse())
        .context("parsing the admin URL")?;
    let ca = args
        .ca
        .clone()
        .or_else(|| endpoint.as_ref().map(|e| e.ca_file.clone()))
        .context("give --ca FILE or --ready-file")?;
    let read_token =
        |given: &Option<String>, file: Option<&PathBuf>| -> anyhow::Result<Option<String>> {
            if let Some(t) = given {
                return Ok(Some(t.clone()));
            }
            match file {
                Some(path) => Ok(Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?
                        .trim()
                        .to_owned(),
                )),
                None => Ok(None),
            }
        };
    let token = read_token(
        &args.enrollment_token,
        endpoint
            .as_ref()
            .and_then(|e| e.enrollment_token_file.as_ref()),
    )?
    .context("give --enrollment-token or a ready file that names the token file")?;
    let admin_token = read_token(
        &args.admin_token,
        endpoint.as_ref().and_then(|e| e.admin_token_file.as_ref()),
    )?;
    let tls = net::tls_config(&ca)?;
    let admin = match &admin_token {
        Some(t) => Some(Admin::new(&ca, admin_url, t.clone())?),
        None => None,
    };
    if args.release.is_some() && admin.is_none() {
        anyhow::bail!("--release needs an admin token (--admin-token or a ready file)");
    }
    let bind = url
        .host_str()
        .and_then(|h| h.parse::<IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback() && ip.is_ipv4());
    let setup = Setup {
        url,
        tls,
        token,
        device_type: args.device_type.clone(),
        running_version: args.running_version.clone(),
        name: args.name.clone(),
        bind,
        per_address: args.per_address.max(1),
    };
    let server_pid = args.server_pid.or_else(measure::find_server_pid);
    if server_pid.is_none() {
        eprintln!("uplift-loadgen: no server pid (give --server-pid); server memory and CPU are not measured");
    }

    // Several generators, one rollout started by another: this one times
    // the offers of a rollout it did not start.
    let follower = args.rollout_file.is_some() && args.release.is_none();
    let clock = WallClock::now();
    let n = args.sessions;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let shared = Arc::new(Shared {
        online: AtomicUsize::new(0),
        welcomes: Mutex::new(Vec::with_capacity(n)),
        drops: Mutex::new(Vec::new()),
        offers: Mutex::new(vec![None; n]),
        enrolled: AtomicUsize::new(0),
        fatal: Mutex::new(Vec::new()),
        retries: AtomicUsize::new(0),
        last_error: Mutex::new(None),
        // A follower's rollout may start before it reads the file.
        timing_offers: AtomicBool::new(follower),
        storm_armed: AtomicBool::new(false),
        storm_dropped: AtomicUsize::new(0),
        storm_back: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));

    // Phase 1: connect every session.
    let before = server_pid.and_then(ProcSample::take);
    let connect_start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let setup = setup.clone();
        let shared = shared.clone();
        let gate = gate.clone();
        let stop = stop_rx.clone();
        tasks.push(tokio::spawn(session_loop(i, setup, shared, gate, stop)));
    }
    let all_up = wait_until(deadline, || {
        shared.fatal.lock().unwrap().len() + shared.online.load(Relaxed) >= n
    })
    .await;
    let connected = shared.online.load(Relaxed);
    let connect_secs = shared
        .welcomes
        .lock()
        .unwrap()
        .last()
        .map_or(0.0, |last| (*last - connect_start).as_secs_f64());
    let after_connect = server_pid.and_then(ProcSample::take);
    if !all_up {
        eprintln!(
            "uplift-loadgen: only {connected} of {n} sessions up by the deadline; last error: {}",
            shared
                .last_error
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_default()
        );
    } else {
        eprintln!("uplift-loadgen: {connected} sessions up in {connect_secs:.2} s");
    }
    if let Some(path) = &args.connected_file {
        std::fs::write(path, format!("{connected}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }

    // Phase 2: idle memory.
    sleep_within(deadline, Duration::from_secs(args.settle)).await;
    let idle = server_pid.and_then(ProcSample::take);
    // A follower's sessions are spread over replicas: one replica's count
    // would say nothing about them.
    let online_by_server = match &admin {
        Some(admin) if !follower => admin.devices_online().await.ok(),
        _ => None,
    };

    // Phase 3: a rollout and its offers.
    let mut rollout = None;
    let mut samples = Samples::default();
    if let (Some(version), Some(admin)) = (&args.release, &admin) {
        shared.timing_offers.store(true, Relaxed);
        let t0 = Instant::now();
        let id = admin.start_rollout(version).await?;
        let start_answered = t0.elapsed();
        if let Some(path) = &args.rollout_file {
            let start = RolloutStart {
                rollout_id: id,
                started_unix_ms: clock.unix_ms(t0),
            };
            std::fs::write(path, serde_json::to_vec(&start)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let (result, offer_ms) =
            time_offers(&shared, deadline, connected, id, clock, clock.unix_ms(t0)).await;
        rollout = Some(RolloutResult {
            start_request_ms: Some(ms(start_answered)),
            ..result
        });
        samples.offer_ms = offer_ms;
    } else if let (true, Some(path)) = (follower, &args.rollout_file) {
        let start: RolloutStart = wait_for_json(path, deadline).await?;
        let (result, offer_ms) = time_offers(
            &shared,
            deadline,
            connected,
            start.rollout_id,
            clock,
            start.started_unix_ms,
        )
        .await;
        rollout = Some(result);
        samples.offer_ms = offer_ms;
    }
    let after_offers = server_pid.and_then(ProcSample::take);

    // Phase 4: hold, or probe the admin API.
    if args.hold > 0 {
        eprintln!(
            "uplift-loadgen: holding {} sessions for {} s",
            shared.online.load(Relaxed),
            args.hold
        );
        sleep_within(deadline, Duration::from_secs(args.hold)).await;
    }
    let mut probe = None;
    let mut download_probe = None;
    if args.probe_admin > 0 {
        let admin = admin
            .as_ref()
            .context("--probe-admin needs an admin token (--admin-token or a ready file)")?;
        let downloads = match &args.probe_downloads {
            Some(version) => Some(DownloadProbe::enroll(&setup, &ca, version).await?),
            None => None,
        };
        let until = (Instant::now() + Duration::from_secs(args.probe_admin)).min(deadline);
        let interval = Duration::from_millis(args.probe_interval_ms.max(1));
        let until_file = args.probe_until_file.as_deref();
        let admin_probes = probe_every(until, until_file, interval, clock, || async {
            admin.devices_online().await.map(|_| ())
        });
        let download_probes = async {
            match &downloads {
                Some(d) => probe_every(until, until_file, interval, clock, || d.fetch()).await,
                None => Vec::new(),
            }
        };
        (samples.probes, samples.download_probes) = tokio::join!(admin_probes, download_probes);
        probe = Some(ProbeResult::of(&samples.probes));
        download_probe = downloads
            .is_some()
            .then(|| ProbeResult::of(&samples.download_probes));
    }

    // Phase 5: the reconnect storm.
    let mut storm = None;
    if args.storm {
        let drops_before = shared.drops.lock().unwrap().len();
        shared.storm_armed.store(true, Relaxed);
        if let Some(path) = &args.storm_ready_file {
            std::fs::write(path, b"ready\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let killed_unix_ms = match &args.storm_kill_file {
            Some(path) => {
                eprintln!("uplift-loadgen: waiting for a replica to be killed (reconnect storm)");
                let killed: Killed = wait_for_json(path, deadline).await?;
                Some(killed.killed_unix_ms)
            }
            None => {
                eprintln!("uplift-loadgen: waiting for the server to restart (reconnect storm)");
                None
            }
        };
        // The only server restarted: every session drops, whenever that is.
        // One replica of several killed: its sessions drop at once, or
        // none of this generator's did.
        let drop_deadline = match killed_unix_ms {
            Some(_) => (Instant::now() + KILL_NOTICE).min(deadline),
            None => deadline,
        };
        let dropped = wait_until(drop_deadline, || shared.storm_dropped.load(Relaxed) > 0).await;
        if dropped {
            // Every session that dropped back again. Sessions notice the
            // kill at different moments (a restarted server may take some
            // back before the last has noticed), so each counts its own.
            let back = match killed_unix_ms {
                None => wait_until(deadline, || shared.storm_back.load(Relaxed) >= connected).await,
                Some(_) => every_dropped_back(&shared, deadline, connected).await,
            };
            let first_drop = shared.drops.lock().unwrap()[drops_before];
            let drops: Vec<Instant> = shared.drops.lock().unwrap()[drops_before..].to_vec();
            let welcomes: Vec<Instant> = shared
                .welcomes
                .lock()
                .unwrap()
                .iter()
                .copied()
                .filter(|w| *w > first_drop)
                .collect();
            let since_kill = |t: Instant| killed_unix_ms.map(|k| clock.unix_ms(t) - k);
            storm = Some(StormResult {
                dropped: shared.storm_dropped.load(Relaxed),
                all_back: back,
                back: shared.storm_back.load(Relaxed),
                first_drop_after_kill_ms: since_kill(first_drop),
                first_back_after_drop_ms: welcomes.first().map(|w| ms(*w - first_drop)),
                all_back_after_drop_ms: back
                    .then(|| welcomes.last().map(|w| ms(*w - first_drop)))
                    .flatten(),
                all_back_after_kill_ms: back
                    .then(|| welcomes.last().and_then(|w| since_kill(*w)))
                    .flatten(),
                all_back_after_first_back_ms: back
                    .then(|| Some(ms(*welcomes.last()? - *welcomes.first()?)))
                    .flatten(),
                peak_sessions_per_sec: measure::peak_rate(&welcomes, Duration::from_secs(1)),
                peak_sessions_per_100ms_x10: measure::peak_rate(
                    &welcomes,
                    Duration::from_millis(100),
                ),
            });
            samples.drop_unix_ms = drops.iter().map(|d| clock.unix_ms(*d)).collect();
            samples.back_unix_ms = welcomes.iter().map(|w| clock.unix_ms(*w)).collect();
        } else {
            storm = Some(StormResult {
                all_back: true,
                ..StormResult::default()
            });
        }
        samples.killed_unix_ms = killed_unix_ms;
    }
    if let Some(path) = &args.samples {
        std::fs::write(path, serde_json::to_vec(&samples)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let linger_end = (Instant::now() + Duration::from_secs(args.linger)).min(deadline);
    wait_until(linger_end, || {
        args.linger_until_file
            .as_deref()
            .is_some_and(|f| f.exists())
    })
    .await;

    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }

    let results = Results {
        sessions: n,
        connected,
        enrolled: shared.enrolled.load(Relaxed),
        refused: shared.fatal.lock().unwrap().len(),
        retries: shared.retries.load(Relaxed),
        connect_secs,
        connect_per_sec: if connect_secs > 0.0 {
            connected as f64 / connect_secs
        } else {
            0.0
        },
        server_pid,
        server_devices_online: online_by_server,
        rss_before_kib: before.map(|s| s.rss_kib),
        rss_idle_kib: idle.map(|s| s.rss_kib),
        rss_after_offers_kib: after_offers.map(|s| s.rss_kib),
        kib_per_session: match (before, idle) {
            (Some(b), Some(i)) if connected > 0 => {
                Some((i.rss_kib as f64 - b.rss_kib as f64) / connected as f64)
            }
            _ => None,
        },
        server_cpu_connect_secs: match (before, after_connect) {
            (Some(b), Some(a)) => Some(a.cpu_secs - b.cpu_secs),
            _ => None,
        },
        server_cpu_secs: match (before, after_offers) {
            (Some(b), Some(a)) => Some(a.cpu_secs - b.cpu_secs),
            _ => None,
        },
        rollout,
        probe,
        download_probe,
        storm,
        last_error: shared.last_error.lock().unwrap().clone(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", results.render());
    }
    if connected < n {
        std::process::exit(2);
    }
    Ok(())
}

/// Written by the generator that starts the rollout, read by the others.
#[derive(Debug, Serialize, Deserialize)]
struct RolloutStart {
    rollout_id: i64,
    /// Just before `POST /api/v1/rollouts`, as UNIX milliseconds.
    started_unix_ms: f64,
}

/// Written by whoever killed a replica.
#[derive(Debug, Deserialize)]
struct Killed {
    killed_unix_ms: f64,
}

/// Raw samples, so that figures over several generators are computed over
/// all their sessions (percentiles of percentiles would not be).
#[derive(Debug, Default, Serialize)]
struct Samples {
    /// Per session offered: from the rollout's start to its offer.
    offer_ms: Vec<f64>,
    killed_unix_ms: Option<f64>,
    /// Storm: every session seen dropping, and every one back.
    drop_unix_ms: Vec<f64>,
    back_unix_ms: Vec<f64>,
    /// The admin API's answers, and the downloads' (--probe-downloads).
    probes: Vec<Probe>,
    download_probes: Vec<Probe>,
}

#[derive(Debug, Serialize)]
struct Probe {
    at_unix_ms: f64,
    ms: f64,
    /// What went wrong, for a probe that failed or timed out.
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct ProbeResult {
    count: usize,
    errors: usize,
    latency: Option<Latencies>,
}

impl ProbeResult {
    fn of(probes: &[Probe]) -> Self {
        Self {
            count: probes.len(),
            errors: probes.iter().filter(|p| p.error.is_some()).count(),
            latency: Latencies::of(
                probes
                    .iter()
                    .filter(|p| p.error.is_none())
                    .map(|p| Duration::from_secs_f64(p.ms / 1e3))
                    .collect(),
            ),
        }
    }
}

/// Waits (to the deadline) until every session up has the offer of
/// `rollout_id`, then measures each from `started_unix_ms`.
async fn time_offers(
    shared: &Shared,
    deadline: Instant,
    connected: usize,
    rollout_id: i64,
    clock: WallClock,
    started_unix_ms: f64,
) -> (RolloutResult, Vec<f64>) {
    let offered = || {
        shared
            .offers
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .filter(|(_, r)| *r == rollout_id)
            .count()
    };
    wait_until(deadline, || offered() >= connected).await;
    let offer_ms: Vec<f64> = shared
        .offers
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .filter(|(_, r)| *r == rollout_id)
        .map(|(at, _)| (clock.unix_ms(*at) - started_unix_ms).max(0.0))
        .collect();
    let result = RolloutResult {
        rollout_id,
        start_request_ms: None,
        offers: offer_ms.len(),
        latency: Latencies::of(
            offer_ms
                .iter()
                .map(|m| Duration::from_secs_f64(m / 1e3))
                .collect(),
        ),
    };
    (result, offer_ms)
}

/// With one replica of several killed: waits until every session that
/// dropped is back and every session up, and stays so for `STORM_QUIET`
/// (a session that noticed its drop late would have dropped meanwhile).
async fn every_dropped_back(shared: &Shared, deadline: Instant, connected: usize) -> bool {
    let settled = || {
        shared.storm_back.load(Relaxed) >= shared.storm_dropped.load(Relaxed)
            && shared.online.load(Relaxed) >= connected
    };
    loop {
        if !wait_until(deadline, settled).await {
            return false;
        }
        let dropped = shared.storm_dropped.load(Relaxed);
        sleep_within(deadline, STORM_QUIET).await;
        if settled() && shared.storm_dropped.load(Relaxed) == dropped {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// Asks `ask` one request at a time, every `interval` until `until` or
/// `until_file` exists; each answer timed (10 s at most).
async fn probe_every<F, Fut>(
    until: Instant,
    until_file: Option<&std::path::Path>,
    interval: Duration,
    clock: WallClock,
    mut ask: F,
) -> Vec<Probe>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut probes = Vec::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let at = Instant::now();
        if at >= until || until_file.is_some_and(|f| f.exists()) {
            return probes;
        }
        let error = match tokio::time::timeout(PROBE_TIMEOUT, ask()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        probes.push(Probe {
            at_unix_ms: clock.unix_ms(at),
            ms: ms(at.elapsed()),
            error,
        });
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls for `path` (written by another process) until the deadline, and
/// parses it.
async fn wait_for_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    deadline: Instant,
) -> anyhow::Result<T> {
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            // Written whole by a rename, or partly: a partial one is read again.
            if let Ok(value) = serde_json::from_slice(&bytes) {
                return Ok(value);
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{} did not appear by the deadline", path.display());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

async fn sleep_within(deadline: Instant, d: Duration) {
    tokio::time::sleep_until((Instant::now() + d).min(deadline)).await;
}

/// The device key of session `i`: derived from the generator's name, so a
/// second run with the same name is the same fleet.
fn device_key(name: &str, i: usize) -> SigningKey {
    let seed: [u8; 32] = Sha256::new()
        .chain_update(b"uplift-loadgen device key\0")
        .chain_update(name.as_bytes())
        .chain_update(b"\0")
        .chain_update((i as u64).to_le_bytes())
        .finalize()
        .into();
    SigningKey::from_bytes(&seed)
}

fn source_address(setup: &Setup, i: usize) -> Option<IpAddr> {
    if !setup.bind {
        return None;
    }
    Some(uplift_loadgen::loopback_source(1, i / setup.per_address))
}

enum End {
    /// Refused for good (enrollment refused, unknown device, bad signature).
    Fatal(anyhow::Error),
    Retry(anyhow::Error),
    Stopped,
}

async fn session_loop(
    i: usize,
    setup: Setup,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let key = device_key(&setup.name, i);
    let mut device_id: Option<DeviceId> = None;
    let mut attempt = 0u32;
    let mut owes_back = false;
    let options = ChannelOptions {
        bind: source_address(&setup, i),
        // Small buffers: this process holds thousands of sessions.
        websocket: WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(2 * MAX_FRAME_BYTES),
    };
    loop {
        let end = tokio::select! {
            end = session(i, &setup, &options, &key, &mut device_id, &shared, &gate, &mut attempt, &mut owes_back) => end,
            _ = stop.wait_for(|s| *s) => End::Stopped,
        };
        match end {
            End::Stopped => return,
            End::Fatal(e) => {
                shared.fatal.lock().unwrap().push(format!("{e:#}"));
                *shared.last_error.lock().unwrap() = Some(format!("{e:#}"));
                return;
            }
            End::Retry(e) => {
                shared.retries.fetch_add(1, Relaxed);
                *shared.last_error.lock().unwrap() = Some(format!("{e:#}"));
                let wait = uplift_agent::run::backoff(attempt, &mut rand::thread_rng());
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    i: usize,
    setup: &Setup,
    options: &ChannelOptions,
    key: &SigningKey,
    device_id: &mut Option<DeviceId>,
    shared: &Shared,
    gate: &Semaphore,
    attempt: &mut u32,
    owes_back: &mut bool,
) -> End {
    let permit = gate.acquire().await.expect("the gate is never closed");
    let hardware_id = format!("{}-{i}", setup.name);
    let (mut ws, welcomed) =
        match hello(setup, options, key, &hardware_id, device_id.as_ref()).await {
            Ok(up) => up,
            Err(end) => return end,
        };
    if welcomed.enrolled {
        shared.enrolled.fetch_add(1, Relaxed);
    }
    *device_id = Some(welcomed.device_id);
    // The first report, as an agent's, right after welcome.
    if let Err(e) = send(&mut ws, &AgentMsg::Report(idle_report(setup))).await {
        return End::Retry(e);
    }
    drop(permit);
    *attempt = 0;
    shared.welcomes.lock().unwrap().push(Instant::now());
    shared.online.fetch_add(1, Relaxed);
    if std::mem::take(owes_back) {
        shared.storm_back.fetch_add(1, Relaxed);
    }
    let end = serve(i, setup, &mut ws, shared).await;
    shared.online.fetch_sub(1, Relaxed);
    shared.drops.lock().unwrap().push(Instant::now());
    if !matches!(end, End::Stopped) && shared.storm_armed.load(Relaxed) {
        *owes_back = true;
        shared.storm_dropped.fetch_add(1, Relaxed);
    }
    end
}

/// What the server's welcome gave a session.
struct Welcomed {
    device_id: DeviceId,
    /// It enrolled on this channel.
    enrolled: bool,
    /// Its download token.
    session_token: String,
}

/// Opens a channel and proves the device's key over the server's nonce,
/// enrolling it as `hardware_id` while its ID is not known: the channel,
/// welcomed, or how the session ends.
async fn hello(
    setup: &Setup,
    options: &ChannelOptions,
    key: &SigningKey,
    hardware_id: &str,
    device_id: Option<&DeviceId>,
) -> Result<(net::Channel, Welcomed), End> {
    let retry = |e: anyhow::Error| Err(End::Retry(e));
    let mut ws = match net::connect_channel_with(&setup.url, setup.tls.clone(), options).await {
        Ok(ws) => ws,
        Err(e) => return retry(e),
    };
    let nonce = match recv(&mut ws).await {
        Ok(ServerMsg::Challenge { nonce }) => match hex::decode(nonce) {
            Ok(n) => n,
            Err(_) => return retry(anyhow::anyhow!("malformed nonce")),
        },
        Ok(other) => return retry(anyhow::anyhow!("expected a challenge, got {other:?}")),
        Err(e) => return retry(e),
    };
    let hello = match device_id {
        Some(id) => AgentMsg::Authenticate {
            device_id: id.clone(),
            signature: B64.encode(
                key.sign(&channel::auth_message(&nonce, id.as_str()))
                    .to_bytes(),
            ),
            features: FEATURES.to_vec(),
        },
        None => {
            let public_key = B64.encode(key.verifying_key().to_bytes());
            let hardware_id: HardwareId = match hardware_id.parse() {
                Ok(h) => h,
                Err(e) => return Err(End::Fatal(anyhow::anyhow!("hardware id: {e}"))),
            };
            AgentMsg::Enroll {
                device_type: setup.device_type.clone(),
                hardware_id,
                token: setup.token.clone(),
                signature: B64.encode(
                    key.sign(&channel::auth_message(&nonce, &public_key))
                        .to_bytes(),
                ),
                public_key,
                features: FEATURES.to_vec(),
            }
        }
    };
    if let Err(e) = send(&mut ws, &hello).await {
        return retry(e);
    }
    match recv(&mut ws).await {
        Ok(ServerMsg::Welcome {
            device_id,
            enrolled,
            session_token,
            ..
        }) => Ok((
            ws,
            Welcomed {
                device_id,
                enrolled,
                session_token,
            },
        )),
        Ok(ServerMsg::Error(err)) => {
            let e = anyhow::anyhow!("server refused the device: {err}");
            Err(match err.kind {
                ErrorKind::EnrollmentRefused
                | ErrorKind::UnknownDevice
                | ErrorKind::BadDeviceSignature
                | ErrorKind::DeviceRemoved => End::Fatal(e),
                _ => End::Retry(e),
            })
        }
        Ok(other) => retry(anyhow::anyhow!("expected welcome, got {other:?}")),
        Err(e) => retry(e),
    }
}

/// The up session: offers recorded and answered, pings answered by the
/// library while it reads, silence past the agent's limit ends it.
async fn serve(i: usize, setup: &Setup, ws: &mut net::Channel, shared: &Shared) -> End {
    loop {
        let frame = match tokio::time::timeout(SILENCE_LIMIT, ws.next()).await {
            Ok(f) => f,
            Err(_) => return End::Retry(anyhow::anyhow!("no word from the server")),
        };
        let text = match frame {
            None | Some(Ok(Message::Close(_))) => {
                return End::Retry(anyhow::anyhow!("server closed the channel"))
            }
            Some(Err(e)) => return End::Retry(e.into()),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
        };
        match channel::decode::<ServerMsg>(text.as_str()) {
            Ok(ServerMsg::Offer(offer)) => {
                if shared.timing_offers.load(Relaxed) {
                    let mut offers = shared.offers.lock().unwrap();
                    if offers[i].is_none() {
                        offers[i] = Some((Instant::now(), offer.rollout_id));
                    }
                }
                // What an agent says when it takes an offer: it starts
                // downloading (this one does not).
                let report = Report {
                    state: AgentState::Downloading,
                    target_version: Some(offer.version),
                    ..idle_report(setup)
                };
                if let Err(e) = send(ws, &AgentMsg::Report(report)).await {
                    return End::Retry(e);
                }
            }
            Ok(ServerMsg::Error(err)) => return End::Retry(anyhow::anyhow!("server error: {err}")),
            Ok(_) => {}
            Err(e) => return End::Retry(anyhow::anyhow!("bad frame from the server: {e}")),
        }
    }
}

fn idle_report(setup: &Setup) -> Report {
    Report {
        state: AgentState::Idle,
        running_version: setup.running_version.clone(),
        booted_slot: SlotName::A,
        target_version: None,
        progress: None,
        error: None,
    }
}

async fn send(ws: &mut net::Channel, msg: &AgentMsg) -> anyhow::Result<()> {
    tokio::time::timeout(
        STEP_TIMEOUT,
        ws.send(Message::Text(channel::encode(msg).into())),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the server did not take the frame"))??;
    Ok(())
}

async fn recv(ws: &mut net::Channel) -> anyhow::Result<ServerMsg> {
    loop {
        let frame = tokio::time::timeout(STEP_TIMEOUT, ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("no message from the server"))?;
        match frame {
            None | Some(Ok(Message::Close(_))) => anyhow::bail!("server closed the channel"),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(text))) => {
                return channel::decode(text.as_str())
                    .map_err(|e| anyhow::anyhow!("bad frame: {e}"))
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// An HTTPS client that trusts only the server's CA, each request bounded
/// by `timeout`.
fn https_client(ca: &std::path::Path, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .timeout(timeout)
        .build()?)
}

/// A device of the probe's own: its download token fetches a release's
/// manifest and first chunk through the device URL (the balancer, with
/// replicas), as an agent's download does.
struct DownloadProbe {
    client: reqwest::Client,
    manifest: reqwest::Url,
    chunk: reqwest::Url,
    token: String,
}

impl DownloadProbe {
    /// Enrolls the probe's device (its channel is closed once welcomed: its
    /// download token outlives it) and finds the release's first chunk.
    async fn enroll(
        setup: &Setup,
        ca: &std::path::Path,
        version: &Version,
    ) -> anyhow::Result<Self> {
        let name = format!("{}-probe", setup.name);
        let probe_type: DeviceType = format!("{}-probe", setup.device_type)
            .parse()
            .context("the probe's device type")?;
        let setup = Setup {
            device_type: probe_type,
            ..setup.clone()
        };
        let key = device_key(&name, 0);
        let welcomed = match hello(&setup, &ChannelOptions::default(), &key, &name, None).await {
            Ok((_channel, welcomed)) => welcomed,
            Err(End::Fatal(e) | End::Retry(e)) => {
                return Err(e.context("enrolling the download probe"))
            }
            Err(End::Stopped) => anyhow::bail!("enrolling the download probe: stopped"),
        };
        let client = https_client(ca, PROBE_TIMEOUT)?;
        let manifest = setup
            .url
            .join(&format!("/v1/device/releases/{version}/manifest"))?;
        let get = |url: reqwest::Url| client.get(url).bearer_auth(&welcomed.session_token).send();
        let signed: uplift_release::manifest::SignedManifest = get(manifest.clone())
            .await
            .and_then(reqwest::Response::error_for_status)
            .context("fetching the release's manifest for the download probe")?
            .json()
            .await
            .context("reading the release's manifest")?;
        let mut listed: uplift_release::manifest::Manifest =
            serde_json::from_str(&signed.signed).context("parsing the release's manifest")?;
        // Its chunks are listed in the manifest, or in its binary index.
        if listed.chunk_index.is_some() {
            let index = get(setup
                .url
                .join(&format!("/v1/device/releases/{version}/index"))?)
            .await
            .and_then(reqwest::Response::error_for_status)
            .context("fetching the release's chunk index")?
            .bytes()
            .await?;
            listed
                .attach_index(&index)
                .context("reading the release's chunk index")?;
        }
        let first = listed
            .chunks
            .first()
            .context("the release lists no chunk")?;
        Ok(Self {
            client,
            chunk: setup
                .url
                .join(&format!("/v1/device/chunks/{}", first.hash))?,
            manifest,
            token: welcomed.session_token,
        })
    }

    /// The manifest, then the chunk, each read to its end.
    async fn fetch(&self) -> anyhow::Result<()> {
        for url in [&self.manifest, &self.chunk] {
            let response = self
                .client
                .get(url.clone())
                .bearer_auth(&self.token)
                .send()
                .await?
                .error_for_status()?;
            response.bytes().await?;
        }
        Ok(())
    }
}

/// The admin API, for the rollout and the server's own count.
#[derive(Debug)]
struct Admin {
    client: reqwest::Client,
    url: reqwest::Url,
    token: String,
}

impl Admin {
    fn new(ca: &std::path::Path, url: reqwest::Url, token: String) -> anyhow::Result<Self> {
        // Starting a rollout of 100 000 devices takes the server some
        // seconds (tens, on a busy machine); probes have their own bound.
        let client = https_client(ca, Duration::from_secs(120))?;
        Ok(Self { client, url, token })
    }

    async fn start_rollout(&self, version: &Version) -> anyhow::Result<i64> {
        let response = self
            .client
            .post(self.url.join("/api/v1/rollouts")?)
            .bearer_auth(&self.token)
            .json(&serde_json::json!({"release": version, "devices": null}))
            .send()
            .await
            .context("starting the rollout")?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.context("reading the rollout")?;
        if !status.is_success() {
            anyhow::bail!("starting the rollout: {status}: {body}");
        }
        body["id"].as_i64().context("the rollout has no id")
    }

    async fn devices_online(&self) -> anyhow::Result<u64> {
        let body: serde_json::Value = self
            .client
            .get(self.url.join("/api/v1/stats")?)
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        body["devices_online"].as_u64().context("no devices_online")
    }
}

#[derive(Debug, Serialize)]
struct RolloutResult {
    rollout_id: i64,
    /// How long `POST /api/v1/rollouts` took to answer (when this
    /// generator started the rollout).
    start_request_ms: Option<f64>,
    /// Sessions that received this rollout's offer.
    offers: usize,
    /// From just before the start request to each session's offer.
    latency: Option<Latencies>,
}

#[derive(Debug, Default, Serialize)]
struct StormResult {
    /// Sessions that dropped once the generator waited for the restart.
    dropped: usize,
    all_back: bool,
    back: usize,
    /// With a replica killed (`--storm-kill-file`): from the kill to the
    /// first session seen dropping, and to the last one back.
    first_drop_after_kill_ms: Option<f64>,
    all_back_after_kill_ms: Option<f64>,
    /// From the first session seen dropping (the kill) to the first back.
    first_back_after_drop_ms: Option<f64>,
    /// From the first drop to the last session back.
    all_back_after_drop_ms: Option<f64>,
    /// From the first session back to the last (the server up throughout).
    all_back_after_first_back_ms: Option<f64>,
    /// Most sessions established within one second.
    peak_sessions_per_sec: usize,
    /// Most sessions within 100 ms, times ten (a burst rate).
    peak_sessions_per_100ms_x10: usize,
}

#[derive(Debug, Serialize)]
struct Results {
    sessions: usize,
    connected: usize,
    /// Sessions the server called enrolled (new, or an enrolled key again).
    enrolled: usize,
    refused: usize,
    retries: usize,
    /// From the first connect to the last welcome.
    connect_secs: f64,
    connect_per_sec: f64,
    server_pid: Option<u32>,
    /// `devices_online` of `GET /api/v1/stats` once all were up.
    server_devices_online: Option<u64>,
    rss_before_kib: Option<u64>,
    rss_idle_kib: Option<u64>,
    rss_after_offers_kib: Option<u64>,
    /// (idle RSS - RSS before) / connected.
    kib_per_session: Option<f64>,
    server_cpu_connect_secs: Option<f64>,
    /// Server CPU time from before the first connect to after the offers.
    server_cpu_secs: Option<f64>,
    rollout: Option<RolloutResult>,
    /// `--probe-admin`: the admin API's answers.
    probe: Option<ProbeResult>,
    /// `--probe-downloads`: the downloads' (a manifest and a chunk each).
    download_probe: Option<ProbeResult>,
    storm: Option<StormResult>,
    last_error: Option<String>,
}

impl Results {
    fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |v| format!("{v:.1} {unit}"));
        let _ = writeln!(
            s,
            "sessions          {} of {} up ({} enrolled, {} refused, {} retries)",
            self.connected, self.sessions, self.enrolled, self.refused, self.retries
        );
        let _ = writeln!(
            s,
            "connect           {:.2} s ({:.0} sessions/s)",
            self.connect_secs, self.connect_per_sec
        );
        if let Some(online) = self.server_devices_online {
            let _ = writeln!(s, "server says       {online} devices online");
        }
        let _ = writeln!(
            s,
            "server RSS        {} before, {} idle, {} after offers",
            opt(self.rss_before_kib.map(|k| k as f64 / 1024.0), "MiB"),
            opt(self.rss_idle_kib.map(|k| k as f64 / 1024.0), "MiB"),
            opt(self.rss_after_offers_kib.map(|k| k as f64 / 1024.0), "MiB"),
        );
        let _ = writeln!(s, "per session       {}", opt(self.kib_per_session, "KiB"));
        let _ = writeln!(
            s,
            "server CPU        {} connecting, {} in all",
            opt(self.server_cpu_connect_secs, "s"),
            opt(self.server_cpu_secs, "s")
        );
        if let Some(r) = &self.rollout {
            let _ = writeln!(
                s,
                "rollout {}         start answered in {}; {} offers",
                r.rollout_id,
                r.start_request_ms
                    .map_or("-".to_owned(), |m| format!("{m:.0} ms")),
                r.offers
            );
            if let Some(l) = &r.latency {
                let _ = writeln!(
                    s,
                    "offer latency     p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                    l.p50_ms, l.p99_ms, l.max_ms
                );
            }
        }
        for (what, probed) in [
            ("admin API        ", &self.probe),
            ("downloads        ", &self.download_probe),
        ] {
            if let Some(p) = probed {
                let _ = writeln!(
                    s,
                    "{what} {} requests, {} failed{}",
                    p.count,
                    p.errors,
                    p.latency.as_ref().map_or(String::new(), |l| format!(
                        "; p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                        l.p50_ms, l.p99_ms, l.max_ms
                    ))
                );
            }
        }
        if let Some(st) = &self.storm {
            let _ = writeln!(
                s,
                "reconnect storm   {} dropped, {} back; first {} after the kill, all {} after it ({} after the first); peak {} sessions/s",
                st.dropped,
                st.back,
                opt(st.first_back_after_drop_ms.map(|m| m / 1e3), "s"),
                opt(st.all_back_after_drop_ms.map(|m| m / 1e3), "s"),
                opt(st.all_back_after_first_back_ms.map(|m| m / 1e3), "s"),
                st.peak_sessions_per_sec
            );
            if let Some(k) = st.all_back_after_kill_ms {
                let _ = writeln!(
                    s,
                    "                  all back {:.1} s after the replica's kill",
                    k / 1e3
                );
            }
        }
        if let Some(e) = &self.last_error {
            let _ = writeln!(s, "last error        {e}");
        }
        s
    }
}
