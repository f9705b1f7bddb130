//! The fan-out floor: what pushing one small frame to every held
//! connection costs on this machine with nothing of Uplift in the way. A
//! server (`serve`) holds TLS WebSocket connections, as `uplift-server`'s
//! device channels are, and on SIGUSR1 sends each a text frame the size of
//! an offer; clients (`connect`) hold sessions, as `uplift-loadgen`'s, from
//! their own loopback source addresses, and note when their frame arrives,
//! answering it (with `--answer-bytes`) as a device reports that it is
//! downloading. `bench/floor` runs them in the topology of `bench/replicas`
//! (the same HAProxy set-up, servers and client processes), so the two
//! runs' offer latencies compare: the floor is what any server would get
//! here, and what is above it is Uplift's.
//!
//! The servers decide nothing, store nothing and relay nothing; a session
//! is one task waiting on one shared signal. No message is parsed.

use crate::measure::WallClock;
use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use uplift_agent::net::{self, ChannelOptions};

/// A TLS or WebSocket handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Handshakes a client has under way at once, as `uplift-loadgen`'s gate.
const CONNECTING: usize = 64;

/// Sessions per loopback source address (127.6.0.0/16), as the load
/// generator's default.
const PER_ADDRESS: usize = 64;

/// The buffers of `uplift-server`'s device channels and of the load
/// generator's sessions: small, so 100 000 sessions fit in memory.
fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Writes a CA (`ca.pem`) and a server certificate for 127.0.0.1 and
/// localhost signed by it (`server.pem`, `server.key`) to `dir`: ECDSA
/// P-256, as `uplift-server` makes its own.
pub fn make_identity(dir: &Path) -> anyhow::Result<()> {
    let ca_key = rcgen::KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fan-out floor CA");
    let ca = ca_params
        .self_signed(&ca_key)
        .context("self-signing the CA")?;
    let key = rcgen::KeyPair::generate().context("generating the server key")?;
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .context("signing the server certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("server.pem", cert.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn server_tls(dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the server certificate and key do not match")?;
    Ok(Arc::new(config))
}

/// Holds every connection made to `listener` (TLS with the identity in
/// `tls_dir`, then WebSocket) until `shutdown`; each time `pushes` changes,
/// sends every held connection one text frame of `frame_bytes` (the
/// binary changes it on SIGUSR1). Frames from clients are read and dropped.
pub async fn serve(
    listener: TcpListener,
    tls_dir: &Path,
    frame_bytes: usize,
    pushes: watch::Receiver<u64>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(tls_dir)?);
    let frame: Arc<str> = "f".repeat(frame_bytes).into();
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: the held ones stay.
                    eprintln!("uplift-fanout-floor: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let (acceptor, pushes, frame) = (acceptor.clone(), pushes.clone(), frame.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let handshakes = async {
                let tls = acceptor.accept(tcp).await.ok()?;
                tokio_tungstenite::accept_async_with_config(tls, Some(websocket_config()))
                    .await
                    .ok()
            };
            if let Ok(Some(ws)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshakes).await {
                hold(ws, pushes, &frame).await;
            }
        });
    }
}

async fn hold<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    mut pushes: watch::Receiver<u64>,
    frame: &str,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        tokio::select! {
            changed = pushes.changed() => {
                if changed.is_err() || ws.send(Message::Text(frame.into())).await.is_err() {
                    return;
                }
            }
            read = ws.next() => match read {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// What [`connect`] is asked to do.
#[derive(Debug, Clone)]
pub struct ConnectPlan {
    /// The server or balancer, `https://127.0.0.1:PORT`.
    pub server: reqwest::Url,
    pub ca: PathBuf,
    pub sessions: usize,
    /// Which share of 127.6.0.0/16 the sessions bind to: the `index`-th
    /// block of `sessions` (clients of one run take different ones).
    pub index: usize,
    /// Answer each frame with one of this many bytes (0: no answer).
    pub answer_bytes: usize,
    pub duration: Duration,
}

/// What [`connect`] measured: when each session's frame arrived (UNIX
/// milliseconds), and how many sessions came up.
#[derive(Debug, serde::Serialize)]
pub struct Received {
    pub connected: usize,
    pub connect_secs: f64,
    pub received_unix_ms: Vec<f64>,
    pub last_error: Option<String>,
}

/// Opens `plan.sessions` sessions, calls `on_connected` once all are up,
/// and returns once each has had its frame or `plan.duration` has passed.
pub async fn connect(
    plan: &ConnectPlan,
    on_connected: impl FnOnce(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Received> {
    let tls = net::tls_config(&plan.ca)?;
    let clock = WallClock::now();
    let started = Instant::now();
    let deadline = started + plan.duration;
    let shared = Arc::new(Shared {
        tls,
        url: plan.server.clone(),
        gate: Semaphore::new(CONNECTING),
        connected: AtomicUsize::new(0),
        arrivals: Mutex::new(Vec::with_capacity(plan.sessions)),
        last_error: Mutex::new(None),
        all_in: Notify::new(),
        answer: "a".repeat(plan.answer_bytes),
        sessions: plan.sessions,
        deadline,
    });
    for i in 0..plan.sessions {
        let options = ChannelOptions {
            bind: Some(crate::loopback_source(
                6,
                (plan.index * plan.sessions + i) / PER_ADDRESS,
            )),
            websocket: websocket_config(),
        };
        tokio::spawn(session(Arc::clone(&shared), options));
    }
    let everyone = tokio::time::timeout_at(deadline, shared.all_in.notified()).await;
    let up = shared.connected.load(Relaxed);
    let connect_secs = started.elapsed().as_secs_f64();
    if everyone.is_err() {
        anyhow::bail!(
            "{up} of {} sessions up within {:?}; last error: {}",
            plan.sessions,
            plan.duration,
            shared
                .last_error
                .lock()
                .unwrap()
                .as_deref()
                .unwrap_or("none")
        );
    }
    on_connected(up)?;
    // Each arrival is stamped by its session; this only looks for the end.
    while shared.arrivals.lock().unwrap().len() < plan.sessions && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received_unix_ms = shared
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|t| clock.unix_ms(*t))
        .collect();
    let last_error = shared.last_error.lock().unwrap().clone();
    Ok(Received {
        connected: up,
        connect_secs,
        received_unix_ms,
        last_error,
    })
}

/// What every session of one [`connect`] call shares.
struct Shared {
    tls: Arc<rustls::ClientConfig>,
    url: reqwest::Url,
    /// Bounds the handshakes in flight.
    gate: Semaphore,
    connected: AtomicUsize,
    arrivals: Mutex<Vec<Instant>>,
    last_error: Mutex<Option<String>>,
    /// Woken once the last session is up.
    all_in: Notify,
    answer: String,
    sessions: usize,
    deadline: Instant,
}

/// One session: connects (retrying until the deadline), stamps its first
/// text frame, answers, and holds its connection.
async fn session(shared: Arc<Shared>, options: ChannelOptions) {
    let mut ws = loop {
        let permit = shared
            .gate
            .acquire()
            .await
            .expect("the gate is never closed");
        match net::connect_channel_with(&shared.url, shared.tls.clone(), &options).await {
            Ok(ws) => break ws,
            Err(e) => {
                *shared.last_error.lock().unwrap() = Some(format!("{e:#}"));
                drop(permit);
                if Instant::now() >= shared.deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    if shared.connected.fetch_add(1, Relaxed) + 1 == shared.sessions {
        shared.all_in.notify_one();
    }
    // The first text frame is the push (a ping or pong is not).
    while let Some(Ok(frame)) = ws.next().await {
        if frame.is_text() {
            shared.arrivals.lock().unwrap().push(Instant::now());
            break;
        }
    }
    if !shared.answer.is_empty() {
        let _ = ws.send(Message::Text(shared.answer.as_str().into())).await;
    }
    // Held until the process ends: the servers' load stays what it was
    // until every session has its frame.
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_session_has_its_frame_once_the_servers_push() {
        let dir = tempfile::tempdir().unwrap();
        make_identity(dir.path()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("https://{}", listener.local_addr().unwrap());
        let (push, pushes) = watch::channel(0);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let tls_dir = dir.path().to_owned();
        let serving = tokio::spawn(async move {
            serve(listener, &tls_dir, 128, pushes, async {
                let _ = stopped.await;
            })
            .await
        });
        let plan = ConnectPlan {
            server: server.parse().unwrap(),
            ca: dir.path().join("ca.pem"),
            sessions: 20,
            index: 0,
            answer_bytes: 139,
            duration: Duration::from_secs(20),
        };
        let mut pushed_at = None;
        let received = connect(&plan, |up| {
            assert_eq!(up, 20, "every session is up before the push");
            pushed_at = Some(WallClock::now().unix_ms(Instant::now()));
            push.send_modify(|n| *n += 1);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(received.connected, 20);
        assert_eq!(received.received_unix_ms.len(), 20, "{received:?}");
        let pushed_at = pushed_at.unwrap();
        assert!(received.received_unix_ms.iter().all(|&t| t >= pushed_at));
        stop.send(()).unwrap();
        serving.await.unwrap().unwrap();
    }
}
