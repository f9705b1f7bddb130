//! The agent's runtime: reads the boot facts, drives the state machine, and
//! performs its actions (health check, boot-env commits, installs, reboot)
//! while a separate task keeps the device channel open with backoff.

use crate::config::{AgentConfig, Reboot};
use crate::install::{InstallGuard, Installer};
use crate::local::LocalState;
use crate::machine::{Action, BootFacts, Event, Machine};
use crate::net;
use crate::systemd::{status_line, Notifier};
use anyhow::Context;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use uplift_bootenv::BootEnv;
use uplift_proto::channel::{self, AgentMsg, Report, ServerMsg, FEATURES};
use uplift_proto::pace;
use uplift_proto::{ErrorKind, SlotName};

/// Kernel command line parameter naming the booted slot.
pub const CMDLINE_KEY: &str = "uplift.slot=";

/// How the agent process should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped by a signal.
    Stopped,
    /// Asked its supervisor to reboot the device.
    RebootRequested,
}

pub fn read_booted_slot(cmdline: &Path) -> anyhow::Result<SlotName> {
    let text = std::fs::read_to_string(cmdline)
        .with_context(|| format!("reading {}", cmdline.display()))?;
    let value = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix(CMDLINE_KEY))
        .with_context(|| {
            format!(
                "cannot tell which slot booted: no {CMDLINE_KEY}a|b in {}; add it to the kernel command line in grub.cfg",
                cmdline.display()
            )
        })?;
    value
        .parse()
        .with_context(|| format!("{}: bad {CMDLINE_KEY}{value}", cmdline.display()))
}

pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Exit> {
    let config = Arc::new(config);
    let local = LocalState::open(&config.state_dir)?;
    let key = local.device_key()?;
    let bootenv = config.boot.env.clone();
    let booted = read_booted_slot(&config.boot.cmdline)?;
    let (_, boot) = bootenv.load_state().with_context(|| bootenv.to_string())?;
    let facts = BootFacts {
        booted,
        boot,
        slots: local.slots()?,
        journal: local.journal()?,
        factory_version: config.factory_version.clone(),
    };
    let (mut machine, first_actions) = Machine::start(facts);
    tracing::info!(slot = %booted, version = %machine.running(), "agent started");
    // What the boot showed is on disk before the server hears of it: an
    // operator who sees "rolled back" finds the environment settled.
    let mut first_actions: VecDeque<Action> = first_actions.into();
    for action in std::mem::take(&mut first_actions) {
        match action {
            Action::AbandonTrial(failure) => {
                record_trial_failure(&bootenv, &local, failure, TrialEnd::Abandon).await;
            }
            Action::AcknowledgeFallback(failure) => {
                record_trial_failure(&bootenv, &local, failure, TrialEnd::FellBack).await;
            }
            other => first_actions.push_back(other),
        }
    }

    let server_url: reqwest::Url = config
        .server_url
        .parse()
        .context("server_url is not a URL")?;
    let tls = net::tls_config(&config.server_ca)?;
    // Downloads go to the server, or to a site cache in front of it.
    let download_url = config.download.base_url(&server_url)?;
    let http = net::http_client(config.download.ca(&config.server_ca), &config.download)?;
    // Through a site cache: the server itself while the cache fails.
    let fallback = match &config.download.url {
        Some(_) => Some(crate::install::Fallback::new(
            server_url.clone(),
            net::http_client(&config.server_ca, &config.download)?,
        )),
        None => None,
    };
    let direct = net::direct_client(&config.server_ca, &config.download)?;
    let (outbox, outbox_rx) = watch::channel((0u64, machine.report()));
    let (sent_tx, sent_rx) = watch::channel(0u64);
    let (token_tx, token_rx) = watch::channel(None::<String>);
    let (inbound_tx, mut inbound) = mpsc::channel::<ServerMsg>(16);
    let (event_tx, mut events) = mpsc::channel::<Event>(64);
    // The channel task's sign of life, for the watchdog (crate::systemd).
    let (beat_tx, beat) = watch::channel(tokio::time::Instant::now());
    // A session token is held exactly while the channel is up.
    let mut online = token_rx.clone();

    let connection = Connection {
        config: config.clone(),
        local: local.clone(),
        key,
        server_url: server_url.clone(),
        tls,
        reports: outbox_rx,
        sent: sent_tx,
        token: token_tx,
        inbound: inbound_tx,
        beat: beat_tx,
        address_hook: Default::default(),
    };
    let mut connection_task = tokio::spawn(connection.run());
    let slot_lock = Arc::new(tokio::sync::Mutex::new(()));
    let mut installer = Installer {
        config: config.clone(),
        http,
        direct,
        server_url: download_url,
        fallback,
        local: local.clone(),
        token: token_rx,
        guard: InstallGuard::new(slot_lock.clone()),
    };
    let mut install: Option<JoinHandle<()>> = None;
    let mut actions = first_actions;
    tokio::pin!(shutdown);
    // Configured, the boot's outcome recorded, the channel task started:
    // ready, whether or not the server is reachable yet.
    let mut systemd = Notifier::from_env();
    systemd.ready(status_line(&machine.report(), false));
    // Fed from this loop's own select!, not from a task of its own: a loop
    // stuck in an action stops feeding it (crate::systemd).
    let mut watchdog = systemd.feed_every().map(|every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });

    loop {
        while let Some(action) = actions.pop_front() {
            match action {
                Action::Report => {
                    outbox.send_modify(|(n, report)| {
                        *n += 1;
                        *report = machine.report();
                    });
                }
                Action::RunHealthCheck => {
                    let command = config.health_check.clone();
                    let limit = Duration::from_secs(config.health_check_timeout_secs);
                    let tx = event_tx.clone();
                    tokio::spawn(async move {
                        let _ = tx
                            .send(Event::HealthCheck(
                                crate::health::run(&command, limit).await,
                            ))
                            .await;
                    });
                }
                Action::CommitTrial => {
                    let (bootenv, local) = (bootenv.clone(), local.clone());
                    match blocking(move || commit_trial(&bootenv, &local, booted)).await {
                        Ok(()) => {
                            tracing::info!(slot = %booted, version = %machine.running(), "committed");
                            actions.extend(machine.handle(Event::Committed));
                        }
                        Err(e) => {
                            tracing::error!("cannot commit slot {booted}: {e:#}");
                            let error =
                                uplift_proto::WireError::new(ErrorKind::BootEnv, format!("{e:#}"));
                            actions.extend(machine.handle(Event::CommitFailed(error)));
                        }
                    }
                }
                Action::AbandonTrial(failure) => {
                    record_trial_failure(&bootenv, &local, failure, TrialEnd::Abandon).await;
                }
                Action::AcknowledgeFallback(failure) => {
                    record_trial_failure(&bootenv, &local, failure, TrialEnd::FellBack).await;
                }
                Action::StartInstall(offer) => {
                    tracing::info!(version = %offer.version, "installing");
                    if let Some(old) = install.take() {
                        installer.guard.cancel();
                        old.abort();
                    }
                    installer.guard = InstallGuard::new(slot_lock.clone());
                    let job = installer.clone().run(
                        machine.install_id(),
                        offer,
                        booted,
                        machine.running().clone(),
                        event_tx.clone(),
                    );
                    install = Some(tokio::spawn(job));
                }
                Action::StartTrial(pending) => {
                    tracing::info!(version = %pending.version, slot = %pending.slot, "switching the boot environment to try the verified slot");
                    // A guard of its own on the shared lock: a cancelled
                    // attempt's step still running finishes first.
                    let guard = InstallGuard::new(slot_lock.clone());
                    let event = match crate::install::start_trial(
                        &guard,
                        &bootenv,
                        &local,
                        pending,
                        config.trial_boot_attempts,
                    )
                    .await
                    {
                        Ok(()) => Event::TrialStarted,
                        Err(e) => {
                            tracing::error!("cannot switch to the verified slot: {e}");
                            Event::TrialFailed(e.to_wire())
                        }
                    };
                    actions.extend(machine.handle(event));
                }
                Action::WithdrawVerified => {
                    tracing::info!(
                        "withdrawing the verified slot that waited for its reboot; staying on {}",
                        machine.running()
                    );
                    let guard = InstallGuard::new(slot_lock.clone());
                    if let Err(e) = crate::install::withdraw_verified(&guard, &local).await {
                        tracing::error!("cannot withdraw the verified slot: {e}; the boot environment does not point at it");
                    }
                }
                Action::RecordFailure(failure) => {
                    let local = local.clone();
                    if let Err(e) = blocking(move || record_install_failure(&local, failure)).await
                    {
                        tracing::error!("cannot record the failed install in the journal: {e:#}");
                    }
                }
                Action::ScheduleRetry { attempt } => {
                    let wait = retry_delay(attempt, &mut rand::thread_rng());
                    tracing::info!(
                        "retrying the install in {:.0}s (attempt {} failed)",
                        wait.as_secs_f32(),
                        attempt
                    );
                    let tx = event_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = tx.send(Event::RetryDue).await;
                    });
                }
                Action::CancelInstall => {
                    if let Some(old) = install.take() {
                        installer.guard.cancel();
                        old.abort();
                    }
                }
                Action::Reboot => {
                    let wanted = outbox.borrow().0;
                    let mut sent = sent_rx.clone();
                    // Give the channel a moment to deliver the last report: the
                    // operator should see "reboot pending" before the device goes.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(3),
                        sent.wait_for(|n| *n >= wanted),
                    )
                    .await;
                    systemd.status(status_line(&machine.report(), online.borrow().is_some()));
                    connection_task.abort();
                    // A reboot command that worked waits to be stopped.
                    return tokio::select! {
                        exit = reboot(&config) => exit,
                        () = &mut shutdown => {
                            systemd.stopping();
                            Ok(Exit::Stopped)
                        }
                    };
                }
            }
        }
        systemd.status(status_line(&machine.report(), online.borrow().is_some()));
        tokio::select! {
            Some(msg) = inbound.recv() => match msg {
                ServerMsg::Offer(offer) => {
                    if offer.version == *machine.running() {
                        tracing::info!(version = %offer.version, "offered {}: already running {}; nothing to download", offer.version, machine.running());
                    }
                    actions.extend(machine.handle(Event::Offer(offer)));
                }
                ServerMsg::NoUpdate => actions.extend(machine.handle(Event::NoUpdate)),
                other => tracing::debug!("ignoring {other:?}"),
            },
            Some(event) = events.recv() => actions.extend(machine.handle(event)),
            // Connected or not: the status line says so.
            Ok(()) = online.changed() => {}
            _ = tick(&mut watchdog) => systemd.tick(*beat.borrow(), tokio::time::Instant::now()),
            ended = &mut connection_task => {
                return match ended {
                    Ok(fatal) => Err(fatal),
                    Err(e) => Err(anyhow::anyhow!("connection task failed: {e}")),
                };
            }
            () = &mut shutdown => {
                systemd.stopping();
                connection_task.abort();
                return Ok(Exit::Stopped);
            }
        }
    }
}

/// The next watchdog tick; never, when systemd set no watchdog.
async fn tick(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// How a trial ended without a commit.
#[derive(Debug, Clone, Copy)]
enum TrialEnd {
    /// The agent gives it up (health check failed); the next boot is the default.
    Abandon,
    /// The bootloader already fell back; clear its mark.
    FellBack,
}

/// Records why the trial failed, then updates the boot environment.
async fn record_trial_failure(
    bootenv: &BootEnv,
    local: &LocalState,
    failure: crate::local::Failure,
    end: TrialEnd,
) {
    tracing::warn!("{}", failure.error.message);
    let (bootenv, local) = (bootenv.clone(), local.clone());
    let recorded = blocking(move || {
        record_failure_then(&local, failure, || {
            bootenv.update(|state| {
                Ok(match end {
                    TrialEnd::Abandon => state.abandon_trial(),
                    TrialEnd::FellBack => state.acknowledge_fallback(),
                })
            })?;
            Ok(())
        })
    })
    .await;
    if let Err(e) = recorded {
        tracing::error!("cannot record the failed trial: {e:#}; the bootloader falls back when its tries run out");
    }
}

/// Runs blocking file work (fsyncs on slow flash) off the runtime thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| anyhow::anyhow!("blocking task failed: {e}"))?
}

/// Trial passed: the booted slot becomes the default in one boot-env write;
/// the journal is cleaned up after (a crash in between is harmless).
fn commit_trial(bootenv: &BootEnv, local: &LocalState, booted: SlotName) -> anyhow::Result<()> {
    bootenv.update(|state| state.commit(booted))?;
    let mut journal = local.journal()?;
    journal.pending = None;
    journal.last_failure = None;
    local.save_journal(&journal)
}

/// Keeps the newest install failure for `uplift-agent status`; the boot
/// choice did not change, so nothing else in the journal does either.
fn record_install_failure(
    local: &LocalState,
    failure: crate::local::Failure,
) -> anyhow::Result<()> {
    let mut journal = local.journal()?;
    journal.last_failure = Some(failure);
    local.save_journal(&journal)
}

/// Saves the failure (so its reason survives the reboot) before changing the boot env.
fn record_failure_then(
    local: &LocalState,
    failure: crate::local::Failure,
    change: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut journal = local.journal()?;
    journal.pending = None;
    if failure.rolled_back && !journal.rolled_back.contains(&failure.version) {
        journal.rolled_back.push(failure.version.clone());
    }
    journal.last_failure = Some(failure);
    local.save_journal(&journal)?;
    change()
}

pub(crate) async fn reboot(config: &AgentConfig) -> anyhow::Result<Exit> {
    match &config.reboot {
        Reboot::Exit => {
            tracing::info!("asking the supervisor to reboot");
            Ok(Exit::RebootRequested)
        }
        Reboot::Command { command } => {
            let (program, args) = command.split_first().context("reboot command is empty")?;
            tracing::info!("rebooting with {command:?}");
            let status = tokio::process::Command::new(program)
                .args(args)
                .status()
                .await;
            match status {
                Ok(s) if s.success() => {
                    // The system is going down; wait to be stopped.
                    std::future::pending::<()>().await;
                    Ok(Exit::Stopped)
                }
                Ok(s) => anyhow::bail!(
                    "reboot command {command:?} exited with {s}; reboot the device by hand"
                ),
                Err(e) => anyhow::bail!("cannot run reboot command {command:?}: {e}"),
            }
        }
    }
}

/// Wait before install attempt `attempt + 1`: seconds, not minutes, since
/// the budget is small; jittered so a fleet does not retry in step.
pub fn retry_delay(attempt: u32, rng: &mut impl Rng) -> Duration {
    let base = Duration::from_secs(2);
    pace::backoff(attempt, base, base * 64, rng.gen())
}

/// Keeps the device channel open: connect, authenticate, forward offers in,
/// reports out; on any loss, reconnect with exponential backoff and jitter.
struct Connection {
    config: Arc<AgentConfig>,
    local: LocalState,
    key: SigningKey,
    server_url: reqwest::Url,
    tls: Arc<rustls::ClientConfig>,
    reports: watch::Receiver<(u64, Report)>,
    sent: watch::Sender<u64>,
    token: watch::Sender<Option<String>>,
    inbound: mpsc::Sender<ServerMsg>,
    /// Refreshed at every step of the channel's loops: the sign of life
    /// the main loop checks before it feeds the watchdog.
    beat: watch::Sender<tokio::time::Instant>,
    /// One address hook at a time: a quick reconnect waits for the last.
    address_hook: Arc<tokio::sync::Mutex<()>>,
}

enum SessionEnd {
    /// Worth retrying (network, server restart).
    Retry(anyhow::Error),
    /// Retrying cannot help: the server refuses this device's credentials.
    Fatal(anyhow::Error),
}

pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Next wait: doubles up to the cap, then takes a random 50–100% of it so a
/// fleet that lost the server together does not come back together.
pub fn backoff(attempt: u32, rng: &mut impl Rng) -> Duration {
    pace::backoff(attempt, BACKOFF_MIN, BACKOFF_MAX, rng.gen())
}

impl Connection {
    async fn run(mut self) -> anyhow::Error {
        let mut attempt = 0u32;
        loop {
            let end = self.session(&mut attempt).await;
            self.alive();
            self.token.send_replace(None);
            match end {
                SessionEnd::Fatal(e) => return e,
                SessionEnd::Retry(e) => {
                    let wait = backoff(attempt, &mut rand::thread_rng());
                    tracing::warn!(
                        "device channel down: {e:#}; reconnecting in {:.1}s",
                        wait.as_secs_f32()
                    );
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn alive(&self) {
        self.beat.send_replace(tokio::time::Instant::now());
    }

    async fn session(&mut self, attempt: &mut u32) -> SessionEnd {
        self.alive();
        let retry = SessionEnd::Retry;
        let mut ws = match net::connect_channel(&self.server_url, self.tls.clone()).await {
            Ok(ws) => ws,
            Err(e) => return retry(e),
        };
        let nonce = match recv(&mut ws, Duration::from_secs(15)).await {
            Ok(ServerMsg::Challenge { nonce }) => match hex::decode(nonce) {
                Ok(n) => n,
                Err(_) => return retry(anyhow::anyhow!("server sent a malformed nonce")),
            },
            Ok(other) => return retry(anyhow::anyhow!("expected a challenge, got {other:?}")),
            Err(e) => return retry(e),
        };
        let known_id = match self.local.device_id() {
            Ok(id) => id,
            Err(e) => return SessionEnd::Fatal(e),
        };
        let hello = match &known_id {
            Some(id) => AgentMsg::Authenticate {
                device_id: id.clone(),
                signature: B64.encode(
                    self.key
                        .sign(&channel::auth_message(&nonce, id.as_str()))
                        .to_bytes(),
                ),
                features: FEATURES.to_vec(),
            },
            None => {
                let public_key = B64.encode(self.key.verifying_key().to_bytes());
                let hardware_id = match self.config.hardware_id() {
                    Ok(h) => h,
                    Err(e) => return SessionEnd::Fatal(e),
                };
                AgentMsg::Enroll {
                    device_type: self.config.device_type.clone(),
                    hardware_id,
                    token: self.config.enrollment_token.clone(),
                    signature: B64.encode(
                        self.key
                            .sign(&channel::auth_message(&nonce, &public_key))
                            .to_bytes(),
                    ),
                    public_key,
                    features: FEATURES.to_vec(),
                }
            }
        };
        match tokio::time::timeout(
            SEND_TIMEOUT,
            ws.send(Message::Text(channel::encode(&hello).into())),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return retry(e.into()),
            Err(_) => return retry(anyhow::anyhow!("the server did not take the hello")),
        }
        // In the server's approval mode the welcome waits for an operator:
        // meanwhile `enrollment_pending` frames come every few seconds.
        let mut told_pending = false;
        let welcome = loop {
            match recv(
                &mut ws,
                Duration::from_secs(if told_pending { 60 } else { 15 }),
            )
            .await
            {
                Ok(ServerMsg::EnrollmentPending { message }) => {
                    self.alive();
                    if !told_pending {
                        tracing::info!("{message}");
                        told_pending = true;
                    }
                }
                other => break other,
            }
        };
        let (token, server_features) = match welcome {
            Ok(ServerMsg::Welcome {
                device_id,
                session_token,
                enrolled,
                features,
                private_addresses,
            }) => {
                if known_id.as_ref() != Some(&device_id) {
                    if let Err(e) = self.local.save_device_id(&device_id) {
                        return SessionEnd::Fatal(e);
                    }
                }
                if enrolled {
                    tracing::info!(device = %device_id, "enrolled");
                } else {
                    tracing::info!(device = %device_id, "connected");
                }
                // Beside the channel, never in its way: a slow or failing
                // hook does not hold up reports or offers.
                let (config, local, lock) = (
                    self.config.clone(),
                    self.local.clone(),
                    self.address_hook.clone(),
                );
                tokio::spawn(async move {
                    let _one_at_a_time = lock.lock().await;
                    crate::address::apply(&config.network, &local, &device_id, private_addresses)
                        .await;
                });
                (session_token, features)
            }
            Ok(ServerMsg::Error(err)) => {
                let e = anyhow::anyhow!("server refused this device: {err}");
                return match err.kind {
                    ErrorKind::EnrollmentRefused
                    | ErrorKind::EnrollmentRejected
                    | ErrorKind::UnknownDevice
                    | ErrorKind::BadDeviceSignature
                    | ErrorKind::DeviceRemoved => SessionEnd::Fatal(e),
                    _ => retry(e),
                };
            }
            Ok(other) => return retry(anyhow::anyhow!("expected welcome, got {other:?}")),
            Err(e) => return retry(e),
        };
        *attempt = 0;
        self.token.send_replace(Some(token));
        self.reports.mark_changed();
        // Anything from the server, pings included, proves the link alive;
        // it pings every 20 s, so this long a silence means a dead link.
        let mut last_heard = tokio::time::Instant::now();
        loop {
            self.alive();
            tokio::select! {
                changed = self.reports.changed() => {
                    if changed.is_err() {
                        return retry(anyhow::anyhow!("agent is stopping"));
                    }
                    let (n, report) = self.reports.borrow_and_update().clone();
                    let report = report.for_server(&server_features);
                    let frame = Message::Text(channel::encode(&AgentMsg::Report(report)).into());
                    match tokio::time::timeout(SEND_TIMEOUT, ws.send(frame)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return retry(e.into()),
                        Err(_) => return retry(anyhow::anyhow!("the server stopped taking reports")),
                    }
                    self.sent.send_replace(n);
                }
                frame = ws.next() => {
                    last_heard = tokio::time::Instant::now();
                    match frame {
                        None | Some(Ok(Message::Close(_))) => return retry(anyhow::anyhow!("server closed the channel")),
                        Some(Err(e)) => return retry(e.into()),
                        Some(Ok(Message::Text(text))) => match channel::decode::<ServerMsg>(text.as_str()) {
                            // Removed by an operator while connected: reconnecting cannot help.
                            Ok(ServerMsg::Error(err)) if err.kind == ErrorKind::DeviceRemoved => {
                                return SessionEnd::Fatal(anyhow::anyhow!("server refused this device: {err}"))
                            }
                            Ok(ServerMsg::Error(err)) => return retry(anyhow::anyhow!("server error: {err}")),
                            // The next download request takes it; one under way keeps the old one, still valid.
                            Ok(ServerMsg::DownloadToken { token, expires_in_secs }) => {
                                tracing::debug!(expires_in_secs, "download token renewed");
                                self.token.send_replace(Some(token));
                            }
                            Ok(msg) => {
                                if self.inbound.send(msg).await.is_err() {
                                    return retry(anyhow::anyhow!("agent is stopping"));
                                }
                            }
                            Err(e) => return retry(anyhow::anyhow!("bad frame from server: {e}")),
                        },
                        // Pings are answered by the library.
                        Some(Ok(_)) => {}
                    }
                }
                () = tokio::time::sleep_until(last_heard + SILENCE_LIMIT) => {
                    return retry(anyhow::anyhow!("no word from the server for {}s", SILENCE_LIMIT.as_secs()));
                }
            }
        }
    }
}

/// How long the server may stay silent (it pings every 20 s).
const SILENCE_LIMIT: Duration = Duration::from_secs(75);
/// How long one frame may take to send before the link counts as dead.
const SEND_TIMEOUT: Duration = Duration::from_secs(15);

/// Next protocol message, skipping pings (answered by the library).
async fn recv(ws: &mut net::Channel, limit: Duration) -> anyhow::Result<ServerMsg> {
    loop {
        let frame = tokio::time::timeout(limit, ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("no message from the server for {}s", limit.as_secs()))?;
        match frame {
            None => anyhow::bail!("server closed the channel"),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(text))) => {
                return channel::decode(text.as_str())
                    .map_err(|e| anyhow::anyhow!("bad frame from server: {e}"))
            }
            Some(Ok(Message::Close(_))) => anyhow::bail!("server closed the channel"),
            Some(Ok(_)) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let first = backoff(0, &mut rng);
        assert!(
            first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN,
            "{first:?}"
        );
        for attempt in [10, 20, 1000] {
            let d = backoff(attempt, &mut rng);
            assert!(d >= BACKOFF_MAX / 2 && d <= BACKOFF_MAX, "{d:?}");
        }
        let spread: std::collections::HashSet<_> = (0..20).map(|_| backoff(5, &mut rng)).collect();
        assert!(spread.len() > 10, "jitter spreads reconnects");
    }

    #[test]
    fn the_booted_slot_comes_from_the_kernel_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cmdline");
        std::fs::write(&path, "root=/dev/sda2 quiet uplift.slot=b\n").unwrap();
        assert_eq!(read_booted_slot(&path).unwrap(), SlotName::B);
        std::fs::write(&path, "root=/dev/sda2 quiet\n").unwrap();
        assert!(format!("{:#}", read_booted_slot(&path).unwrap_err()).contains("uplift.slot="));
    }
}
