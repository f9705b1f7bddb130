//! The agent's runtime: reads the boot facts, drives the state machine, and
//! performs its actions (health check, boot-env commits, installs, reboot)
//! while a separate task keeps the device channel open with backoff.

use crate::config::{AgentConfig, Reboot};
use crate::install::{InstallGuard, Installer};
use crate::local::{Enrollment, LocalState};
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
use uplift_proto::channel::{self, AgentMsg, Feature, Report, ServerMsg, FEATURES};
use uplift_proto::pace;
use uplift_proto::{DeviceId, ErrorKind, SlotName, WireError};

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
    let (machine, mut actions, booted) = settle_boot(&config, &local).await?;
    let clients = Clients::new(&config)?;
    let (outbox, outbox_rx) = watch::channel((0u64, machine.report()));
    let (sent_tx, sent_rx) = watch::channel(0u64);
    let (token_tx, token_rx) = watch::channel(None::<String>);
    let (inbound_tx, mut inbound) = mpsc::channel::<ServerMsg>(16);
    let (event_tx, mut events) = mpsc::channel::<Event>(64);
    // The channel task's sign of life, for the watchdog (crate::systemd).
    let (beat_tx, beat) = watch::channel(tokio::time::Instant::now());

    let connection = Connection {
        config: config.clone(),
        local: local.clone(),
        key,
        server_url: clients.server_url,
        tls: clients.tls,
        reports: outbox_rx,
        sent: sent_tx,
        token: token_tx,
        inbound: inbound_tx,
        beat: beat_tx,
        address_hook: Default::default(),
    };
    let mut connection_task = tokio::spawn(connection.run());
    let slot_lock = Arc::new(tokio::sync::Mutex::new(()));
    let mut agent = Agent {
        installer: Installer {
            config: config.clone(),
            http: clients.http,
            direct: clients.direct,
            server_url: clients.download_url,
            fallback: clients.fallback,
            local: local.clone(),
            // A session token is held exactly while the channel is up.
            token: token_rx.clone(),
            guard: InstallGuard::new(slot_lock.clone()),
        },
        bootenv: config.boot.env.clone(),
        config,
        local,
        booted,
        machine,
        install: None,
        slot_lock,
        outbox,
        sent: sent_rx,
        online: token_rx,
        events: event_tx,
        systemd: Notifier::from_env(),
    };
    tokio::pin!(shutdown);
    // Configured, the boot's outcome recorded, the channel task started:
    // ready, whether or not the server is reachable yet.
    agent
        .systemd
        .ready(status_line(&agent.machine.report(), false));
    // Fed from this loop's own select!, not from a task of its own: a loop
    // stuck in an action stops feeding it (crate::systemd).
    let mut watchdog = agent.systemd.feed_every().map(|every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });

    loop {
        while let Some(action) = actions.pop_front() {
            match agent.perform(action).await {
                Next::Actions(more) => actions.extend(more),
                Next::Reboot => return agent.reboot(&mut shutdown, connection_task).await,
            }
        }
        agent.show_status();
        tokio::select! {
            Some(msg) = inbound.recv() => actions.extend(agent.take_message(msg)),
            Some(event) = events.recv() => actions.extend(agent.machine.handle(event)),
            // Connected or not: the status line says so.
            Ok(()) = agent.online.changed() => {}
            _ = tick(&mut watchdog) => agent.systemd.tick(*beat.borrow(), tokio::time::Instant::now()),
            ended = &mut connection_task => {
                return match ended {
                    Ok(fatal) => Err(fatal),
                    Err(e) => Err(anyhow::anyhow!("connection task failed: {e}")),
                };
            }
            () = &mut shutdown => {
                agent.systemd.stopping();
                connection_task.abort();
                return Ok(Exit::Stopped);
            }
        }
    }
}

/// Reads what this boot shows (slot, boot environment, slot table,
/// journal) and starts the state machine on it. A trial that failed or a
/// fallback the bootloader made is recorded on disk before the server
/// hears of it: an operator who sees "rolled back" finds the environment
/// settled. Returns the machine, its remaining first actions, and the
/// booted slot.
async fn settle_boot(
    config: &AgentConfig,
    local: &LocalState,
) -> anyhow::Result<(Machine, VecDeque<Action>, SlotName)> {
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
    let (machine, first_actions) = Machine::start(facts);
    tracing::info!(slot = %booted, version = %machine.running(), "agent started");
    let mut rest = VecDeque::new();
    for action in first_actions {
        match action {
            Action::AbandonTrial(failure) => {
                record_trial_failure(&bootenv, local, failure, TrialEnd::Abandon).await;
            }
            Action::AcknowledgeFallback(failure) => {
                record_trial_failure(&bootenv, local, failure, TrialEnd::FellBack).await;
            }
            other => rest.push_back(other),
        }
    }
    Ok((machine, rest, booted))
}

/// The agent's connections: the channel's TLS, and the HTTP clients for
/// downloads.
struct Clients {
    server_url: reqwest::Url,
    tls: Arc<rustls::ClientConfig>,
    /// Downloads go to the server, or to a site cache in front of it.
    download_url: reqwest::Url,
    http: reqwest::Client,
    /// Through a site cache: the server itself while the cache fails.
    fallback: Option<crate::install::Fallback>,
    /// For presigned object-store URLs the server redirects to.
    direct: reqwest::Client,
}

impl Clients {
    fn new(config: &AgentConfig) -> anyhow::Result<Self> {
        let server_url: reqwest::Url = config
            .server_url
            .parse()
            .context("server_url is not a URL")?;
        let fallback = match &config.download.url {
            Some(_) => Some(crate::install::Fallback::new(
                server_url.clone(),
                net::http_client(&config.server_ca, &config.download)?,
            )),
            None => None,
        };
        Ok(Self {
            tls: net::tls_config(&config.server_ca)?,
            download_url: config.download.base_url(&server_url)?,
            http: net::http_client(config.download.ca(&config.server_ca), &config.download)?,
            fallback,
            direct: net::direct_client(&config.server_ca, &config.download)?,
            server_url,
        })
    }
}

/// What the main loop does after an action.
enum Next {
    /// Carry on, with these actions first.
    Actions(Vec<Action>),
    /// Reboot: the last thing this process does.
    Reboot,
}

/// The state machine and what carries out its actions on this boot.
struct Agent {
    config: Arc<AgentConfig>,
    local: LocalState,
    bootenv: BootEnv,
    booted: SlotName,
    machine: Machine,
    installer: Installer,
    /// The install under way, if any.
    install: Option<JoinHandle<()>>,
    /// Held by whatever writes the inactive slot or the boot environment.
    slot_lock: Arc<tokio::sync::Mutex<()>>,
    /// The newest report for the channel task, numbered.
    outbox: watch::Sender<(u64, Report)>,
    /// The number of the last report the channel task sent.
    sent: watch::Receiver<u64>,
    /// The download token: `Some` exactly while the channel is up.
    online: watch::Receiver<Option<String>>,
    events: mpsc::Sender<Event>,
    systemd: Notifier,
}

impl Agent {
    /// Carries out one action but the reboot (the main loop's last);
    /// returns what the machine wants done next.
    async fn perform(&mut self, action: Action) -> Next {
        let more = match action {
            Action::Report => {
                let report = self.machine.report();
                self.outbox.send_modify(|(n, last)| {
                    *n += 1;
                    *last = report;
                });
                Vec::new()
            }
            Action::RunHealthCheck => {
                self.run_health_check();
                Vec::new()
            }
            Action::CommitTrial => self.commit_trial().await,
            Action::AbandonTrial(failure) => {
                record_trial_failure(&self.bootenv, &self.local, failure, TrialEnd::Abandon).await;
                Vec::new()
            }
            Action::AcknowledgeFallback(failure) => {
                record_trial_failure(&self.bootenv, &self.local, failure, TrialEnd::FellBack).await;
                Vec::new()
            }
            Action::StartInstall(offer) => {
                self.start_install(offer);
                Vec::new()
            }
            Action::StartTrial(pending) => self.start_trial(pending).await,
            Action::WithdrawVerified => {
                self.withdraw_verified().await;
                Vec::new()
            }
            Action::RecordFailure(failure) => {
                let local = self.local.clone();
                if let Err(e) = blocking(move || record_install_failure(&local, failure)).await {
                    tracing::error!("cannot record the failed install in the journal: {e:#}");
                }
                Vec::new()
            }
            Action::ScheduleRetry { attempt } => {
                self.schedule_retry(attempt);
                Vec::new()
            }
            Action::CancelInstall => {
                self.cancel_install();
                Vec::new()
            }
            Action::Reboot => return Next::Reboot,
        };
        Next::Actions(more)
    }

    async fn withdraw_verified(&self) {
        tracing::info!(
            "withdrawing the verified slot that waited for its reboot; staying on {}",
            self.machine.running()
        );
        let guard = InstallGuard::new(self.slot_lock.clone());
        if let Err(e) = crate::install::withdraw_verified(&guard, &self.local).await {
            tracing::error!(
                "cannot withdraw the verified slot: {e}; the boot environment does not point at it"
            );
        }
    }

    /// An offer or a withdrawal from the server, for the machine.
    fn take_message(&mut self, msg: ServerMsg) -> Vec<Action> {
        match msg {
            ServerMsg::Offer(offer) => {
                if offer.version == *self.machine.running() {
                    tracing::info!(version = %offer.version, "offered {}: already running {}; nothing to download", offer.version, self.machine.running());
                }
                self.machine.handle(Event::Offer(offer))
            }
            ServerMsg::NoUpdate => self.machine.handle(Event::NoUpdate),
            other => {
                tracing::debug!("ignoring {other:?}");
                Vec::new()
            }
        }
    }

    fn show_status(&mut self) {
        let connected = self.online.borrow().is_some();
        self.systemd
            .status(status_line(&self.machine.report(), connected));
    }

    fn run_health_check(&self) {
        let command = self.config.health_check.clone();
        let limit = Duration::from_secs(self.config.health_check_timeout_secs);
        let events = self.events.clone();
        tokio::spawn(async move {
            let outcome = crate::health::run(&command, limit).await;
            let _ = events.send(Event::HealthCheck(outcome)).await;
        });
    }

    /// The trial passed: the booted slot becomes the default.
    async fn commit_trial(&mut self) -> Vec<Action> {
        let (bootenv, local, booted) = (self.bootenv.clone(), self.local.clone(), self.booted);
        match blocking(move || commit_trial(&bootenv, &local, booted)).await {
            Ok(()) => {
                tracing::info!(slot = %booted, version = %self.machine.running(), "committed");
                self.machine.handle(Event::Committed)
            }
            Err(e) => {
                tracing::error!("cannot commit slot {booted}: {e:#}");
                let error = WireError::new(ErrorKind::BootEnv, format!("{e:#}"));
                self.machine.handle(Event::CommitFailed(error))
            }
        }
    }

    /// Starts installing `offer`, cancelling an install still under way.
    fn start_install(&mut self, offer: channel::Offer) {
        tracing::info!(version = %offer.version, "installing");
        self.cancel_install();
        self.installer.guard = InstallGuard::new(self.slot_lock.clone());
        let job = self.installer.clone().run(
            self.machine.install_id(),
            offer,
            self.booted,
            self.machine.running().clone(),
            self.events.clone(),
        );
        self.install = Some(tokio::spawn(job));
    }

    fn cancel_install(&mut self) {
        if let Some(old) = self.install.take() {
            self.installer.guard.cancel();
            old.abort();
        }
    }

    /// Points the boot environment at the verified slot for one trial.
    async fn start_trial(&mut self, pending: crate::local::PendingInstall) -> Vec<Action> {
        tracing::info!(version = %pending.version, slot = %pending.slot, "switching the boot environment to try the verified slot");
        // A guard of its own on the shared lock: a cancelled attempt's
        // step still running finishes first.
        let guard = InstallGuard::new(self.slot_lock.clone());
        let event = match crate::install::start_trial(
            &guard,
            &self.bootenv,
            &self.local,
            pending,
            self.config.trial_boot_attempts,
        )
        .await
        {
            Ok(()) => Event::TrialStarted,
            Err(e) => {
                tracing::error!("cannot switch to the verified slot: {e}");
                Event::TrialFailed(e.to_wire())
            }
        };
        self.machine.handle(event)
    }

    fn schedule_retry(&self, attempt: u32) {
        let wait = retry_delay(attempt, &mut rand::thread_rng());
        tracing::info!(
            "retrying the install in {:.0}s (attempt {} failed)",
            wait.as_secs_f32(),
            attempt
        );
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = events.send(Event::RetryDue).await;
        });
    }

    /// Reboots into the slot the boot environment now names, once the
    /// channel has had a moment to deliver the last report (the operator
    /// should see "reboot pending" before the device goes).
    async fn reboot(
        &mut self,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
        connection: JoinHandle<anyhow::Error>,
    ) -> anyhow::Result<Exit> {
        let wanted = self.outbox.borrow().0;
        let mut sent = self.sent.clone();
        let _ = tokio::time::timeout(Duration::from_secs(3), sent.wait_for(|n| *n >= wanted)).await;
        self.show_status();
        connection.abort();
        // A reboot command that worked waits to be stopped.
        tokio::select! {
            exit = reboot(&self.config) => exit,
            () = shutdown => {
                self.systemd.stopping();
                Ok(Exit::Stopped)
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

    /// One connection: the handshake, then frames both ways until it ends.
    async fn session(&mut self, attempt: &mut u32) -> SessionEnd {
        self.alive();
        let mut ws = match net::connect_channel(&self.server_url, self.tls.clone()).await {
            Ok(ws) => ws,
            Err(e) => return SessionEnd::Retry(e),
        };
        let welcomed = match self.handshake(&mut ws).await {
            Ok(welcomed) => welcomed,
            Err(end) => return end,
        };
        *attempt = 0;
        self.token.send_replace(Some(welcomed.session_token));
        self.reports.mark_changed();
        self.exchange(&mut ws, &welcomed.features).await
    }

    /// The server's challenge, this device's proof of its key (or its
    /// enrollment), and the server's welcome.
    async fn handshake(&mut self, ws: &mut net::Channel) -> Result<Welcomed, SessionEnd> {
        let nonce = match recv(ws, HANDSHAKE_WAIT).await.map_err(SessionEnd::Retry)? {
            ServerMsg::Challenge { nonce } => hex::decode(nonce)
                .map_err(|_| SessionEnd::Retry(anyhow::anyhow!("server sent a malformed nonce")))?,
            other => {
                return Err(SessionEnd::Retry(anyhow::anyhow!(
                    "expected a challenge, got {other:?}"
                )))
            }
        };
        let local = self.local.clone();
        let known_id = blocking(move || local.device_id())
            .await
            .map_err(SessionEnd::Fatal)?;
        let hello = match self.hello(&nonce, known_id.as_ref()) {
            Ok(hello) => hello,
            Err(e) => {
                let message = format!("cannot enroll: {e:#}");
                self.note_enrollment(Some(Enrollment::Refused { message }))
                    .await;
                return Err(SessionEnd::Fatal(e));
            }
        };
        send(ws, &hello, "the hello").await?;
        match self.wait_for_welcome(ws).await.map_err(SessionEnd::Retry)? {
            ServerMsg::Welcome {
                device_id,
                session_token,
                enrolled,
                features,
                private_addresses,
            } => {
                if known_id.as_ref() != Some(&device_id) {
                    let (local, id) = (self.local.clone(), device_id.clone());
                    blocking(move || local.save_device_id(&id))
                        .await
                        .map_err(SessionEnd::Fatal)?;
                }
                // Also after a crash between the ID and this: a stale note
                // would say the device still waits.
                self.note_enrollment(None).await;
                if enrolled {
                    tracing::info!(device = %device_id, "enrolled");
                } else {
                    tracing::info!(device = %device_id, "connected");
                }
                self.apply_addresses(device_id, private_addresses);
                Ok(Welcomed {
                    session_token,
                    features,
                })
            }
            ServerMsg::Error(err) => {
                let message = err.to_string();
                let end = refusal(err);
                if known_id.is_none() && matches!(end, SessionEnd::Fatal(_)) {
                    self.note_enrollment(Some(Enrollment::Refused { message }))
                        .await;
                }
                Err(end)
            }
            other => Err(SessionEnd::Retry(anyhow::anyhow!(
                "expected welcome, got {other:?}"
            ))),
        }
    }

    /// `authenticate` with the device's ID, or `enroll` before it has one:
    /// either signs the server's nonce with the device's key.
    fn hello(&self, nonce: &[u8], known_id: Option<&DeviceId>) -> anyhow::Result<AgentMsg> {
        let sign = |identity: &str| {
            B64.encode(
                self.key
                    .sign(&channel::auth_message(nonce, identity))
                    .to_bytes(),
            )
        };
        Ok(match known_id {
            Some(id) => AgentMsg::Authenticate {
                device_id: id.clone(),
                signature: sign(id.as_str()),
                features: FEATURES.to_vec(),
            },
            None => {
                let public_key = B64.encode(self.key.verifying_key().to_bytes());
                AgentMsg::Enroll {
                    device_type: self.config.device_type.clone(),
                    hardware_id: self.config.hardware_id()?,
                    token: self.config.enrollment_token.clone(),
                    signature: sign(&public_key),
                    public_key,
                    features: FEATURES.to_vec(),
                }
            }
        })
    }

    /// The server's answer to the hello. In its approval mode the welcome
    /// waits for an operator: meanwhile `enrollment_pending` frames come
    /// every few seconds, each a sign the link is alive.
    async fn wait_for_welcome(&self, ws: &mut net::Channel) -> anyhow::Result<ServerMsg> {
        let mut told_pending = false;
        loop {
            let wait = if told_pending {
                PENDING_WAIT
            } else {
                HANDSHAKE_WAIT
            };
            match recv(ws, wait).await? {
                ServerMsg::EnrollmentPending { message } => {
                    self.alive();
                    if !told_pending {
                        tracing::info!("{message}");
                        self.note_enrollment(Some(Enrollment::Pending { message }))
                            .await;
                        told_pending = true;
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// Keeps what the server said about the enrollment for `uplift-agent
    /// status` (`None`: the device has its ID, nothing to say); a note
    /// that cannot be written is only logged.
    async fn note_enrollment(&self, note: Option<Enrollment>) {
        let local = self.local.clone();
        if let Err(e) = blocking(move || local.save_enrollment(note.as_ref())).await {
            tracing::warn!("cannot record the enrollment's state for `uplift-agent status`: {e:#}");
        }
    }

    /// Sets up the device's private addresses beside the channel, never in
    /// its way: a slow or failing hook does not hold up reports or offers.
    fn apply_addresses(&self, device_id: DeviceId, private_addresses: Vec<String>) {
        let (config, local, lock) = (
            self.config.clone(),
            self.local.clone(),
            self.address_hook.clone(),
        );
        tokio::spawn(async move {
            let _one_at_a_time = lock.lock().await;
            crate::address::apply(&config.network, &local, &device_id, private_addresses).await;
        });
    }

    /// After the welcome: reports out as they change, the server's frames
    /// in, until the link fails, falls silent or the server refuses.
    async fn exchange(&mut self, ws: &mut net::Channel, server_features: &[Feature]) -> SessionEnd {
        // Anything from the server, pings included, proves the link alive;
        // it pings every 20 s, so this long a silence means a dead link.
        let mut last_heard = tokio::time::Instant::now();
        loop {
            self.alive();
            let step = tokio::select! {
                changed = self.reports.changed() => match changed {
                    Ok(()) => self.send_report(ws, server_features).await,
                    Err(_) => Err(SessionEnd::Retry(anyhow::anyhow!("agent is stopping"))),
                },
                frame = ws.next() => {
                    last_heard = tokio::time::Instant::now();
                    self.take_frame(frame).await
                }
                () = tokio::time::sleep_until(last_heard + SILENCE_LIMIT) => Err(SessionEnd::Retry(
                    anyhow::anyhow!("no word from the server for {}s", SILENCE_LIMIT.as_secs()),
                )),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Sends the newest report, in the form the server understands.
    async fn send_report(
        &mut self,
        ws: &mut net::Channel,
        server_features: &[Feature],
    ) -> Result<(), SessionEnd> {
        let (n, report) = self.reports.borrow_and_update().clone();
        send(
            ws,
            &AgentMsg::Report(report.for_server(server_features)),
            "a report",
        )
        .await?;
        self.sent.send_replace(n);
        Ok(())
    }

    /// One frame from the server: a new download token is kept here, a
    /// refusal ends the session, anything else goes to the state machine.
    async fn take_frame(
        &mut self,
        frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), SessionEnd> {
        let retry = |e: anyhow::Error| Err(SessionEnd::Retry(e));
        let text = match frame {
            None | Some(Ok(Message::Close(_))) => {
                return retry(anyhow::anyhow!("server closed the channel"))
            }
            Some(Err(e)) => return retry(e.into()),
            Some(Ok(Message::Text(text))) => text,
            // Pings are answered by the library.
            Some(Ok(_)) => return Ok(()),
        };
        match channel::decode::<ServerMsg>(text.as_str()) {
            Err(e) => retry(anyhow::anyhow!("bad frame from server: {e}")),
            // Removed by an operator while connected: reconnecting cannot
            // help. Any other error ends only this connection.
            Ok(ServerMsg::Error(err)) if err.kind == ErrorKind::DeviceRemoved => Err(refusal(err)),
            Ok(ServerMsg::Error(err)) => retry(anyhow::anyhow!("server error: {err}")),
            // The next download request takes it; one under way keeps the
            // old one, still valid.
            Ok(ServerMsg::DownloadToken {
                token,
                expires_in_secs,
            }) => {
                tracing::debug!(expires_in_secs, "download token renewed");
                self.token.send_replace(Some(token));
                Ok(())
            }
            Ok(msg) => match self.inbound.send(msg).await {
                Ok(()) => Ok(()),
                Err(_) => retry(anyhow::anyhow!("agent is stopping")),
            },
        }
    }
}

/// What the welcome gave this session.
struct Welcomed {
    session_token: String,
    features: Vec<Feature>,
}

/// How the session ends on an error from the server: for good when the
/// server refuses this device's credentials or removed it (reconnecting
/// cannot help), else to be retried.
fn refusal(err: WireError) -> SessionEnd {
    let fatal = matches!(
        err.kind,
        ErrorKind::EnrollmentRefused
            | ErrorKind::EnrollmentRejected
            | ErrorKind::UnknownDevice
            | ErrorKind::BadDeviceSignature
            | ErrorKind::DeviceRemoved
    );
    if fatal {
        SessionEnd::Fatal(anyhow::anyhow!("server refused this device: {err}"))
    } else {
        SessionEnd::Retry(anyhow::anyhow!("server error: {err}"))
    }
}

/// Sends one frame, bounded: a server that stops taking frames is a dead link.
async fn send(ws: &mut net::Channel, msg: &AgentMsg, what: &str) -> Result<(), SessionEnd> {
    let frame = Message::Text(channel::encode(msg).into());
    match tokio::time::timeout(SEND_TIMEOUT, ws.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SessionEnd::Retry(e.into())),
        Err(_) => Err(SessionEnd::Retry(anyhow::anyhow!(
            "the server did not take {what} within {}s",
            SEND_TIMEOUT.as_secs()
        ))),
    }
}

/// How long the server may take to challenge, then to answer the hello.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(15);
/// How long between `enrollment_pending` frames before the link counts as dead.
const PENDING_WAIT: Duration = Duration::from_secs(60);
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

    #[test]
    fn only_a_refusal_of_the_devices_credentials_or_its_removal_stops_reconnecting() {
        for kind in [
            ErrorKind::EnrollmentRefused,
            ErrorKind::EnrollmentRejected,
            ErrorKind::UnknownDevice,
            ErrorKind::BadDeviceSignature,
            ErrorKind::DeviceRemoved,
        ] {
            let end = refusal(WireError::new(kind, "refused"));
            assert!(matches!(end, SessionEnd::Fatal(_)), "{kind:?}");
        }
        for kind in [
            ErrorKind::MalformedFrame,
            ErrorKind::UnsupportedProtocol,
            ErrorKind::UnexpectedMessage,
            ErrorKind::Unauthorized,
        ] {
            let end = refusal(WireError::new(kind, "try again"));
            assert!(matches!(end, SessionEnd::Retry(_)), "{kind:?}");
        }
    }
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
