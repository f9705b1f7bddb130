//! Hostile input against the real `uplift-server` binary, over real TLS.
//!
//! Every test starts its own server process (own data directory, a free
//! loopback port, killed on drop), attacks it, and checks three things: the
//! attacker gets a clear error (an `error` frame with the right stable kind on
//! the device channel, or the right HTTP status with a `{kind, message}` JSON
//! body on the API), the connection or request is refused, and nothing else
//! is affected: a well-behaved device still enrolls, authenticates and gets
//! its Welcome, and the admin device list holds exactly the devices that
//! legitimately enrolled. Every wait is bounded.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};
use futures_util::{SinkExt as _, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::ServerName;
use serde_json::json;
use std::collections::BTreeSet;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strum::IntoEnumIterator as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use uplift_proto::api::{
    admin_chunk_path, device_chunk_path, device_history_path, device_path, device_tags_path,
    DeviceHistory, DevicePage, DeviceView, MissingChunksResponse, ReleaseView, RolloutView,
    ServerEndpoint, DEVICES_PATH, FLEET_PATH, HEALTH_PATH, MAX_PAGE_LIMIT, METRICS_PATH,
    MISSING_CHUNKS_PATH, OPENAPI_PATH, RELEASES_PATH, ROLLOUTS_PATH, ROLLOUT_PREVIEW_PATH,
    STATS_PATH,
};
use uplift_proto::auth::{
    Permission, Role, TokenCreated, TokenView, AUDIT_PATH, TOKENS_PATH, WHOAMI_PATH,
};
use uplift_proto::channel::{self, ServerMsg, CHANNEL_PATH, MAX_FRAME_BYTES};
use uplift_proto::{ChunkHash, DeviceId, ErrorKind, SlotName, WireError};
use uplift_release::{
    encode_chunk, sha256, sign_manifest, ChunkEntry, Compression, ImageInfo, Manifest,
    ReleaseSigningKey, SignedManifest, MANIFEST_FORMAT, MAX_MANIFEST_BYTES,
};

/// Upper bound for any single thing we wait for.
const WAIT: Duration = Duration::from_secs(20);
/// Written next to (outside of) the data directory: no response may ever contain it.
const SECRET: &str = "secret-outside-the-data-dir-7f3a";
const DEVICE_TYPE: &str = "gateway-x86";

type Ws = WebSocketStream<TlsStream<TcpStream>>;

// ---------------------------------------------------------------- server

/// A running `uplift-server` process; killed when dropped.
struct Server {
    child: Child,
    _tmp: tempfile::TempDir,
    /// Holds the data directory, the secret files, the ready file and the log.
    root: PathBuf,
    addr: SocketAddr,
    url: String,
    /// Where the admin API is, when it has a listener of its own.
    admin_url: Option<String>,
    admin_token: String,
    enrollment_token: String,
    tls: Arc<rustls::ClientConfig>,
    http: reqwest::Client,
    log: PathBuf,
    /// Devices that enrolled legitimately: the admin list must hold exactly these.
    legit: Mutex<BTreeSet<String>>,
    next_hw: AtomicU32,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log_tail(60));
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn client_tls(ca_file: &Path) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(ca_file).expect("reading the server's CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("CA parses")).expect("CA is usable");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl Server {
    async fn start() -> Server {
        Self::start_with_limits(None).await
    }

    /// Starts a server; `limits` is the body of a `[limits]` TOML table.
    async fn start_with_limits(limits: Option<&str>) -> Server {
        Self::start_with(limits, &[]).await
    }

    async fn start_with(limits: Option<&str>, extra_args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let root = tmp.path().to_owned();
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(root.join("secret"), SECRET).unwrap();
        std::fs::write(root.join("passwd"), SECRET).unwrap();
        let ready = root.join("ready.json");
        let log = root.join("server.log");
        let log_file = File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uplift-server"));
        if let Some(limits) = limits {
            let config = root.join("server.toml");
            let data_str = serde_json::to_string(data.to_str().unwrap()).unwrap();
            std::fs::write(
                &config,
                format!("data_dir = {data_str}\n\n[limits]\n{limits}\n"),
            )
            .unwrap();
            cmd.arg("--config").arg(&config);
        }
        cmd.arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--ready-file")
            .arg(&ready)
            .args(extra_args)
            .env("RUST_LOG", "uplift_server=debug")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        let mut child = cmd.spawn().expect("starting uplift-server");
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoint: ServerEndpoint = loop {
            if let Ok(bytes) = std::fs::read(&ready) {
                break serde_json::from_slice(&bytes).expect("ready file is an endpoint");
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "uplift-server exited with {status} before listening:\n{}",
                    tail(&log, 30)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("uplift-server did not start in 30 s:\n{}", tail(&log, 30));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let read_token = |path: &Option<PathBuf>| {
            std::fs::read_to_string(path.as_ref().expect("token generated"))
                .unwrap()
                .trim()
                .to_owned()
        };
        let admin_token = read_token(&endpoint.admin_token_file);
        let enrollment_token = read_token(&endpoint.enrollment_token_file);
        let addr: SocketAddr = endpoint
            .url
            .strip_prefix("https://")
            .expect("https URL")
            .parse()
            .expect("URL holds a socket address");
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&endpoint.ca_file).unwrap())
            .expect("CA parses");
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(WAIT)
            .build()
            .unwrap();
        Server {
            child,
            _tmp: tmp,
            root,
            addr,
            url: endpoint.url.clone(),
            admin_url: endpoint.admin_url.clone(),
            admin_token,
            enrollment_token,
            tls: client_tls(&endpoint.ca_file),
            http,
            log,
            legit: Mutex::new(BTreeSet::new()),
            next_hw: AtomicU32::new(0),
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the server died ({status}):\n{}", tail(&self.log, 40));
        }
    }

    async fn tls(&self) -> TlsStream<TcpStream> {
        let tcp = timeout(WAIT, TcpStream::connect(self.addr))
            .await
            .expect("TCP connect within bound")
            .expect("TCP connect");
        let name = ServerName::try_from("127.0.0.1").unwrap();
        timeout(
            WAIT,
            tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp),
        )
        .await
        .expect("TLS handshake within bound")
        .expect("TLS handshake")
    }

    /// Opens the device channel and reads the server's challenge.
    async fn channel(&self) -> (Ws, Vec<u8>) {
        let tls = self.tls().await;
        let url = format!("wss://{}{CHANNEL_PATH}", self.addr);
        let (mut ws, _) = timeout(WAIT, tokio_tungstenite::client_async(url, tls))
            .await
            .expect("WebSocket handshake within bound")
            .expect("WebSocket handshake");
        let nonce = match recv(&mut ws).await {
            ServerMsg::Challenge { nonce } => hex::decode(nonce).expect("hex nonce"),
            other => panic!("expected a challenge first, got {other:?}"),
        };
        (ws, nonce)
    }

    fn hardware_id(&self) -> String {
        format!("hw-{}", self.next_hw.fetch_add(1, Ordering::Relaxed))
    }

    /// A well-behaved device enrolls: fresh key, the fleet token, a Welcome.
    async fn enroll(&self) -> Enrolled {
        let identity = Identity::new();
        let (mut ws, nonce) = self.channel().await;
        let hw = self.hardware_id();
        send_text(
            &mut ws,
            identity.enroll_frame(&nonce, &self.enrollment_token, DEVICE_TYPE, &hw),
        )
        .await;
        let (device_id, session_token) = match recv(&mut ws).await {
            ServerMsg::Welcome {
                device_id,
                session_token,
                enrolled: true,
                ..
            } => (device_id, session_token),
            other => panic!(
                "a well-behaved device must get a Welcome on enrollment, got {other:?}\n{}",
                self.log_tail(20)
            ),
        };
        assert_eq!(recv(&mut ws).await, ServerMsg::NoUpdate);
        self.legit
            .lock()
            .unwrap()
            .insert(device_id.as_str().to_owned());
        Enrolled {
            ws,
            identity,
            device_id,
            session_token,
        }
    }

    /// A known device reconnects with a signature over a fresh nonce.
    async fn authenticate(&self, identity: &Identity, device_id: &DeviceId) -> (Ws, String) {
        let (mut ws, nonce) = self.channel().await;
        send_text(
            &mut ws,
            identity.authenticate_frame(&nonce, device_id.as_str()),
        )
        .await;
        match recv(&mut ws).await {
            ServerMsg::Welcome {
                device_id: got,
                session_token,
                enrolled: false,
                ..
            } if got == *device_id => {
                assert_eq!(recv(&mut ws).await, ServerMsg::NoUpdate);
                (ws, session_token)
            }
            other => panic!("device {device_id} must be welcomed back, got {other:?}"),
        }
    }

    /// Nothing else was affected: a fresh device enrolls and reconnects, and
    /// the admin list holds exactly the legitimately enrolled devices.
    async fn assert_unaffected(&mut self) {
        self.assert_running();
        let mut dev = self.enroll().await;
        let _ = dev.ws.close(None).await;
        let (mut ws, _) = self.authenticate(&dev.identity, &dev.device_id).await;
        let _ = ws.close(None).await;
        let ids: BTreeSet<String> = self
            .devices()
            .await
            .into_iter()
            .map(|d| d.id.as_str().to_owned())
            .collect();
        assert_eq!(
            ids,
            *self.legit.lock().unwrap(),
            "the device list holds exactly the devices that enrolled legitimately"
        );
        self.assert_running();
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url))
    }

    fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let base = self.admin_url.as_deref().unwrap_or(&self.url);
        self.http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&self.admin_token)
    }

    /// Every device: the tests enroll far fewer than one page holds.
    async fn devices(&self) -> Vec<DeviceView> {
        let resp = self
            .admin(
                reqwest::Method::GET,
                &format!("{DEVICES_PATH}?limit={MAX_PAGE_LIMIT}"),
            )
            .send()
            .await
            .expect("device list");
        assert_eq!(resp.status(), 200);
        let page: DevicePage = resp.json().await.expect("device list JSON");
        assert_eq!(page.next, None, "one page holds every device here");
        page.devices
    }

    async fn releases(&self) -> Vec<ReleaseView> {
        let resp = self
            .admin(reqwest::Method::GET, RELEASES_PATH)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    async fn missing(&self, hashes: &[ChunkHash]) -> Vec<ChunkHash> {
        let resp = self
            .admin(reqwest::Method::POST, MISSING_CHUNKS_PATH)
            .json(&json!({ "chunks": hashes }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<MissingChunksResponse>().await.unwrap().missing
    }

    async fn put_chunk(&self, name: &str, body: Vec<u8>) -> reqwest::Response {
        self.admin(reqwest::Method::PUT, &format!("/api/v1/chunks/{name}"))
            .body(body)
            .send()
            .await
            .expect("chunk upload gets an answer")
    }

    /// One HTTP/1.1 request over a fresh TLS connection, byte for byte as
    /// given (no URL normalization by a client library).
    async fn raw_http(&self, head: &str, body: &[u8]) -> RawResponse {
        let mut tls = self.tls().await;
        let request = format!(
            "{head}\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // The server may answer (and close) before it has read a body it
        // refuses; its answer is what counts, not whether our write finished.
        let _ = timeout(WAIT, async {
            tls.write_all(request.as_bytes()).await?;
            tls.write_all(body).await?;
            tls.flush().await
        })
        .await;
        let mut raw = Vec::new();
        let read = timeout(WAIT, async {
            let mut buf = [0u8; 8192];
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the server answers {head:?} within {WAIT:?}");
        RawResponse::parse(&raw)
    }
}

struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn parse(raw: &[u8]) -> RawResponse {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        if chunked {
            body = dechunk(&body);
        }
        RawResponse {
            status,
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json_error(&self, status: u16, kind: ErrorKind) -> WireError {
        let text = String::from_utf8_lossy(&self.body);
        assert!(!text.contains(SECRET), "a file outside the data dir leaked");
        assert_eq!(self.status, status, "body: {text}");
        check_error_body(self.header("content-type"), &self.body, kind)
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&body[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .expect("chunk size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&body[eol + 2..eol + 2 + size]);
        body = &body[eol + 2 + size + 2..];
    }
    out
}

fn check_error_body(content_type: Option<&str>, body: &[u8], kind: ErrorKind) -> WireError {
    let text = String::from_utf8_lossy(body);
    assert!(
        content_type.is_some_and(|c| c.starts_with("application/json")),
        "error responses are JSON, got content-type {content_type:?}: {text}"
    );
    let err: WireError = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("error body is not {{kind, message}}: {e}: {text}"));
    assert_eq!(err.kind, kind, "{err}");
    assert!(
        err.message.len() > 10,
        "the message says what failed: {err}"
    );
    err
}

/// Checks status and the `{kind, message}` JSON body of an API error.
async fn json_error(resp: reqwest::Response, status: u16, kind: ErrorKind) -> WireError {
    let got = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.bytes().await.expect("error body");
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains(SECRET), "a file outside the data dir leaked");
    assert_eq!(got, status, "body: {text}");
    check_error_body(content_type.as_deref(), &body, kind)
}

// ---------------------------------------------------------------- devices

struct Identity {
    key: SigningKey,
    public_key: String,
}

impl Identity {
    fn new() -> Identity {
        let key = SigningKey::from_bytes(&rand::random());
        let public_key = B64.encode(key.verifying_key().to_bytes());
        Identity { key, public_key }
    }

    fn sign(&self, nonce: &[u8], claimed: &str) -> String {
        B64.encode(
            self.key
                .sign(&channel::auth_message(nonce, claimed))
                .to_bytes(),
        )
    }

    /// Built as raw JSON so tests can send values the typed messages refuse.
    fn enroll_frame(&self, nonce: &[u8], token: &str, device_type: &str, hw: &str) -> String {
        json!({
            "v": 1,
            "type": "enroll",
            "device_type": device_type,
            "hardware_id": hw,
            "token": token,
            "public_key": self.public_key,
            "signature": self.sign(nonce, &self.public_key),
        })
        .to_string()
    }

    fn authenticate_frame(&self, nonce: &[u8], device_id: &str) -> String {
        json!({
            "v": 1,
            "type": "authenticate",
            "device_id": device_id,
            "signature": self.sign(nonce, device_id),
        })
        .to_string()
    }
}

struct Enrolled {
    ws: Ws,
    identity: Identity,
    device_id: DeviceId,
    session_token: String,
}

fn report_frame() -> String {
    report_frame_of("idle", "1.0", "a", None)
}

fn report_frame_of(state: &str, version: &str, slot: &str, target: Option<&str>) -> String {
    let progress = (state == "downloading")
        .then(|| json!({"done_bytes": 1, "total_bytes": 100, "fetched_bytes": 1}));
    json!({
        "v": 1,
        "type": "report",
        "state": state,
        "running_version": version,
        "booted_slot": slot,
        "target_version": target,
        "progress": progress,
        "error": null,
    })
    .to_string()
}

async fn send_text(ws: &mut Ws, text: String) {
    timeout(WAIT, ws.send(Message::text(text)))
        .await
        .expect("send within bound")
        .expect("send");
}

/// Next server message; pings are skipped.
async fn recv(ws: &mut Ws) -> ServerMsg {
    loop {
        let msg = timeout(WAIT, ws.next())
            .await
            .expect("the server answers within bound")
            .expect("the channel is still open")
            .expect("the channel is readable");
        match msg {
            Message::Text(text) => {
                return channel::decode(text.as_str())
                    .unwrap_or_else(|e| panic!("server frame {text:?} does not decode: {e}"))
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame from the server, got {other:?}"),
        }
    }
}

/// Waits until the server has closed the channel; it must send nothing more.
async fn expect_closed(ws: &mut Ws) {
    let closed = timeout(WAIT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_) | Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("the server sent {other:?} after refusing"),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server closes a refused channel");
}

/// The server answers with an error frame of `kind`, then closes.
async fn expect_refusal(ws: &mut Ws, kind: ErrorKind) -> WireError {
    match recv(ws).await {
        ServerMsg::Error(err) => {
            assert_eq!(err.kind, kind, "{err}");
            assert!(err.message.len() > 10, "the message explains: {err}");
            expect_closed(ws).await;
            err
        }
        other => panic!("expected an error frame of kind {kind}, got {other:?}"),
    }
}

/// One masked client frame, written as raw bytes; `declared` overrides the
/// length in the header (to lie about it).
fn raw_frame(fin: bool, opcode: u8, payload: &[u8], declared: Option<u64>) -> Vec<u8> {
    let len = declared.unwrap_or(payload.len() as u64);
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= 0xffff {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&len.to_be_bytes());
    }
    // An all-zero mask key leaves the payload as it is.
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

async fn send_raw(ws: &mut Ws, bytes: &[u8]) {
    let stream = ws.get_mut();
    // The server may refuse before reading everything; that is fine.
    let _ = timeout(WAIT, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await;
}

// ---------------------------------------------------------------- channel

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_frames_are_refused() {
    let mut srv = Server::start().await;
    for bad in [
        "this is not json",
        "{\"v\":1,\"type\":",
        "[1,2,3]",
        "null",
        "{\"type\":\"report\"}",
        "",
    ] {
        let (mut ws, _) = srv.channel().await;
        send_text(&mut ws, bad.to_owned()).await;
        let err = expect_refusal(&mut ws, ErrorKind::MalformedFrame).await;
        assert!(!err.message.is_empty(), "{bad:?}: {err}");
    }
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame_is_refused() {
    let mut srv = Server::start().await;
    // Truncated JSON inside a complete WebSocket frame.
    let (mut ws, nonce) = srv.channel().await;
    let full = Identity::new().enroll_frame(&nonce, &srv.enrollment_token, DEVICE_TYPE, "hw-t");
    send_text(&mut ws, full[..full.len() / 2].to_owned()).await;
    expect_refusal(&mut ws, ErrorKind::MalformedFrame).await;

    // A WebSocket frame cut off on the wire: the header announces 1000 bytes,
    // 10 arrive, then the client stops sending. The server must not hang on
    // it, and must not treat it as a message.
    let (mut ws, _) = srv.channel().await;
    send_raw(&mut ws, &raw_frame(true, 0x1, b"{\"v\":1,\"ty", Some(1000))).await;
    let _ = timeout(WAIT, ws.get_mut().shutdown()).await;
    let closed = timeout(WAIT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Text(text))) => {
                    let msg: ServerMsg = channel::decode(text.as_str()).unwrap();
                    assert!(
                        matches!(&msg, ServerMsg::Error(e) if e.kind == ErrorKind::MalformedFrame),
                        "only an error may answer a truncated frame, got {msg:?}"
                    );
                }
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server closes a truncated channel");
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_refused_before_and_after_authentication() {
    let mut srv = Server::start().await;
    let (mut ws, _) = srv.channel().await;
    timeout(WAIT, ws.send(Message::binary(report_frame().into_bytes())))
        .await
        .unwrap()
        .unwrap();
    expect_refusal(&mut ws, ErrorKind::MalformedFrame).await;

    let mut dev = srv.enroll().await;
    timeout(WAIT, dev.ws.send(Message::binary(vec![0u8, 1, 2, 3])))
        .await
        .unwrap()
        .unwrap();
    expect_refusal(&mut dev.ws, ErrorKind::MalformedFrame).await;
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused() {
    let mut srv = Server::start().await;
    let pad = "x".repeat(MAX_FRAME_BYTES + 1024);
    let big = format!(r#"{{"v":1,"type":"report","pad":"{pad}"}}"#);

    // One frame over the limit, before authentication.
    let (mut ws, _) = srv.channel().await;
    let _ = timeout(WAIT, ws.send(Message::text(big.clone()))).await;
    expect_refusal(&mut ws, ErrorKind::FrameTooLarge).await;

    // A header announcing a terabyte: refused at once, nothing allocated.
    let (mut ws, _) = srv.channel().await;
    send_raw(&mut ws, &raw_frame(true, 0x1, b"{}", Some(1 << 40))).await;
    expect_refusal(&mut ws, ErrorKind::FrameTooLarge).await;

    // Fragments each under the limit that add up to more than it.
    let (mut ws, _) = srv.channel().await;
    let half = vec![b'x'; MAX_FRAME_BYTES / 2 + 1024];
    let mut bytes = raw_frame(false, 0x1, &half, None);
    bytes.extend(raw_frame(true, 0x0, &half, None));
    send_raw(&mut ws, &bytes).await;
    expect_refusal(&mut ws, ErrorKind::FrameTooLarge).await;

    // After authentication.
    let mut dev = srv.enroll().await;
    let _ = timeout(WAIT, dev.ws.send(Message::text(big))).await;
    expect_refusal(&mut dev.ws, ErrorKind::FrameTooLarge).await;
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_break_the_websocket_protocol_are_refused() {
    let mut srv = Server::start().await;
    let cases: [(&str, Vec<u8>); 4] = [
        ("reserved opcode", raw_frame(true, 0x3, b"{}", None)),
        (
            "text that is not UTF-8",
            raw_frame(true, 0x1, &[0xff, 0xfe, 0xfd], None),
        ),
        (
            "continuation without a start",
            raw_frame(true, 0x0, b"{}", None),
        ),
        ("fragmented ping", raw_frame(false, 0x9, b"", None)),
    ];
    for (what, bytes) in cases {
        let (mut ws, _) = srv.channel().await;
        send_raw(&mut ws, &bytes).await;
        match recv(&mut ws).await {
            ServerMsg::Error(err) => {
                assert_eq!(err.kind, ErrorKind::MalformedFrame, "{what}: {err}")
            }
            other => panic!("{what}: expected a malformed_frame error, got {other:?}"),
        }
        expect_closed(&mut ws).await;
    }
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_message_types_are_refused() {
    let mut srv = Server::start().await;
    for bad in [
        r#"{"v":1,"type":"launch_missiles"}"#,
        r#"{"v":1,"type":"welcome","device_id":"dev-1","session_token":"x","enrolled":true}"#,
        r#"{"v":1}"#,
    ] {
        let (mut ws, _) = srv.channel().await;
        send_text(&mut ws, bad.to_owned()).await;
        expect_refusal(&mut ws, ErrorKind::MalformedFrame).await;
    }
    let mut dev = srv.enroll().await;
    send_text(
        &mut dev.ws,
        r#"{"v":1,"type":"launch_missiles"}"#.to_owned(),
    )
    .await;
    expect_refusal(&mut dev.ws, ErrorKind::MalformedFrame).await;
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_from_a_future_protocol_is_refused() {
    let mut srv = Server::start().await;
    let (mut ws, nonce) = srv.channel().await;
    let frame = Identity::new()
        .enroll_frame(&nonce, &srv.enrollment_token, DEVICE_TYPE, "hw-future")
        .replacen("\"v\":1", "\"v\":99", 1);
    assert!(frame.contains("\"v\":99"), "{frame}");
    send_text(&mut ws, frame).await;
    let err = expect_refusal(&mut ws, ErrorKind::UnsupportedProtocol).await;
    assert!(err.message.contains("99"), "names the version: {err}");

    let mut dev = srv.enroll().await;
    send_text(
        &mut dev.ws,
        report_frame().replacen("\"v\":1", "\"v\":99", 1),
    )
    .await;
    expect_refusal(&mut dev.ws, ErrorKind::UnsupportedProtocol).await;
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_before_authentication_is_refused_and_not_recorded() {
    let mut srv = Server::start().await;
    let (mut ws, _) = srv.channel().await;
    send_text(&mut ws, report_frame()).await;
    expect_refusal(&mut ws, ErrorKind::UnexpectedMessage).await;
    srv.assert_unaffected().await;
    assert!(
        srv.devices().await.iter().all(|d| d.state.is_none()),
        "no report was recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_enroll_or_authenticate_after_welcome_is_refused() {
    let mut srv = Server::start().await;
    let mut dev = srv.enroll().await;
    let again = dev
        .identity
        .enroll_frame(&[0; 32], &srv.enrollment_token, DEVICE_TYPE, "hw-again");
    send_text(&mut dev.ws, again).await;
    expect_refusal(&mut dev.ws, ErrorKind::UnexpectedMessage).await;

    let mut dev = srv.enroll().await;
    let again = dev
        .identity
        .authenticate_frame(&[0; 32], dev.device_id.as_str());
    send_text(&mut dev.ws, again).await;
    expect_refusal(&mut dev.ws, ErrorKind::UnexpectedMessage).await;
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_after_the_auth_timeout() {
    let mut srv = Server::start_with_limits(Some("auth_timeout_secs = 1")).await;
    let started = Instant::now();
    let (mut ws, _) = srv.channel().await;
    let err = expect_refusal(&mut ws, ErrorKind::Unauthorized).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "closed after {took:?}, the auth timeout is 1 s"
    );
    assert!(
        err.message.contains("1 s"),
        "says how long it waited: {err}"
    );

    // Pings do not count as authenticating.
    let started = Instant::now();
    let (mut ws, _) = srv.channel().await;
    let pinging = async {
        loop {
            if ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let _ = timeout(Duration::from_secs(3), pinging).await;
    let closed = timeout(WAIT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a pinging but silent client is closed too");
    assert!(started.elapsed() < WAIT);
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_with_a_bad_signature_is_refused_and_nothing_is_stored() {
    let mut srv = Server::start().await;
    let token = srv.enrollment_token.clone();
    let id = Identity::new();
    let other = Identity::new();
    type Forge = fn(&Identity, &Identity, &[u8]) -> String;
    let forgeries: [(&str, Forge); 5] = [
        ("signed over another nonce", |id, _, _| {
            id.sign(&[7; 32], &id.public_key)
        }),
        ("signed by another key", |id, other, nonce| {
            other.sign(nonce, &id.public_key)
        }),
        ("signed for another identity", |id, _, nonce| {
            id.sign(nonce, "dev-0000000000000000")
        }),
        ("not base64", |_, _, _| "!!not base64!!".to_owned()),
        ("too short", |_, _, _| B64.encode([1u8; 10])),
    ];
    for (what, forge) in forgeries {
        let (mut ws, nonce) = srv.channel().await;
        let mut frame: serde_json::Value =
            serde_json::from_str(&id.enroll_frame(&nonce, &token, DEVICE_TYPE, "hw-forged"))
                .unwrap();
        frame["signature"] = forge(&id, &other, &nonce).into();
        send_text(&mut ws, frame.to_string()).await;
        match recv(&mut ws).await {
            ServerMsg::Error(err) => {
                assert_eq!(err.kind, ErrorKind::BadDeviceSignature, "{what}: {err}")
            }
            other => panic!("{what}: expected bad_device_signature, got {other:?}"),
        }
        expect_closed(&mut ws).await;
    }
    // A public key that is not one.
    let (mut ws, nonce) = srv.channel().await;
    let mut frame: serde_json::Value =
        serde_json::from_str(&id.enroll_frame(&nonce, &token, DEVICE_TYPE, "hw-forged")).unwrap();
    frame["public_key"] = B64.encode([1u8; 7]).into();
    send_text(&mut ws, frame.to_string()).await;
    expect_refusal(&mut ws, ErrorKind::BadRequest).await;
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_with_the_wrong_token_is_refused_and_nothing_is_stored() {
    let mut srv = Server::start().await;
    let admin_token = srv.admin_token.clone();
    let wrong_tokens = [
        "not-the-fleet-token".to_owned(),
        String::new(),
        admin_token,
        format!("{} ", srv.enrollment_token),
    ];
    for token in wrong_tokens {
        let (mut ws, nonce) = srv.channel().await;
        send_text(
            &mut ws,
            Identity::new().enroll_frame(&nonce, &token, DEVICE_TYPE, "hw-intruder"),
        )
        .await;
        let err = expect_refusal(&mut ws, ErrorKind::EnrollmentRefused).await;
        assert!(
            !err.message.contains(&srv.enrollment_token),
            "the refusal does not leak the token: {err}"
        );
    }
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticate_with_an_unknown_device_id_is_refused() {
    let mut srv = Server::start().await;
    let (mut ws, nonce) = srv.channel().await;
    let id = Identity::new();
    send_text(
        &mut ws,
        id.authenticate_frame(&nonce, "dev-00000000deadbeef"),
    )
    .await;
    let err = expect_refusal(&mut ws, ErrorKind::UnknownDevice).await;
    assert!(err.message.contains("dev-00000000deadbeef"), "{err}");
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticate_as_another_device_is_refused_and_the_device_is_unaffected() {
    let mut srv = Server::start().await;
    let mut victim = srv.enroll().await;
    let victim_id = victim.device_id.as_str().to_owned();

    // Another key signing for the victim's ID.
    let (mut ws, nonce) = srv.channel().await;
    send_text(
        &mut ws,
        Identity::new().authenticate_frame(&nonce, &victim_id),
    )
    .await;
    expect_refusal(&mut ws, ErrorKind::BadDeviceSignature).await;

    // The victim's own signature, replayed from an earlier connection.
    let (ws, nonce) = srv.channel().await;
    let replay = victim.identity.authenticate_frame(&nonce, &victim_id);
    drop(ws);
    let (mut ws, _) = srv.channel().await;
    send_text(&mut ws, replay).await;
    expect_refusal(&mut ws, ErrorKind::BadDeviceSignature).await;

    // The victim's session is untouched: still online, its token still works.
    let me = srv
        .devices()
        .await
        .into_iter()
        .find(|d| d.id.as_str() == victim_id)
        .expect("victim listed");
    assert!(me.online, "the victim is still connected");
    let resp = srv
        .request(
            reqwest::Method::GET,
            &device_chunk_path(&sha256(b"nothing")),
        )
        .bearer_auth(&victim.session_token)
        .send()
        .await
        .unwrap();
    json_error(resp, 404, ErrorKind::NotFound).await;
    send_text(&mut victim.ws, report_frame()).await;
    srv.assert_unaffected().await;
}

/// The race seen with 200 devices, end to end: a rebooted device's new
/// session says `idle` on 1.1, then the replaced session sends `downloading`
/// reports. The server keeps what the new session said and closes the
/// replaced session. (The exact interleaving, a backlog applied after the
/// new session's report, is replayed deterministically in `live.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_sessions_backlog_does_not_overwrite_the_new_session() {
    let mut srv = Server::start().await;
    let Enrolled {
        ws: mut old,
        identity,
        device_id,
        ..
    } = srv.enroll().await;
    send_text(
        &mut old,
        report_frame_of("downloading", "1.0", "a", Some("1.1")),
    )
    .await;
    let device_of = |devices: Vec<DeviceView>| {
        devices
            .into_iter()
            .find(|d| d.id == device_id)
            .expect("device listed")
    };
    let state_of = |devices: Vec<DeviceView>| {
        let d = device_of(devices);
        (
            d.state.map(|s| s.as_str()),
            d.running_version.map(|v| v.to_string()),
            d.online,
        )
    };
    let until = Instant::now() + WAIT;
    while state_of(srv.devices().await).0 != Some("downloading") {
        assert!(Instant::now() < until, "the first report is never shown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The device is shown with the slot it reported and the address its
    // channel's connection came from, as this end of it sees its own.
    let address_of = |ws: &Ws| ws.get_ref().get_ref().0.local_addr().unwrap().to_string();
    let shown = device_of(srv.devices().await);
    assert_eq!(
        (shown.slot, shown.address),
        (Some(SlotName::A), Some(address_of(&old)))
    );

    // The device reboots into 1.1 and reconnects before the server noticed
    // the old socket is dead; its new session reports idle.
    let (mut new, _) = srv.authenticate(&identity, &device_id).await;
    send_text(&mut new, report_frame_of("idle", "1.1", "b", None)).await;
    let until = Instant::now() + WAIT;
    while state_of(srv.devices().await).0 != Some("idle") {
        assert!(
            Instant::now() < until,
            "the new session's report is never shown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Now the old session's backlog: twenty stale progress reports.
    for _ in 0..20 {
        let frame = report_frame_of("downloading", "1.0", "a", Some("1.1"));
        if timeout(WAIT, old.send(Message::text(frame)))
            .await
            .map_or(true, |r| r.is_err())
        {
            break; // already closed by the server: even better
        }
    }
    let old_address = address_of(&old);
    expect_closed(&mut old).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        state_of(srv.devices().await),
        (Some("idle"), Some("1.1".to_owned()), true),
        "what the new session said stands"
    );
    // Its address and slot too: the new connection's, not the old one's.
    let shown = device_of(srv.devices().await);
    assert_eq!(
        (shown.slot, shown.address.clone()),
        (Some(SlotName::B), Some(address_of(&new)))
    );
    assert_ne!(shown.address, Some(old_address));
    // The new session is the live one: it still reports and is heard.
    send_text(
        &mut new,
        report_frame_of("downloading", "1.1", "b", Some("1.2")),
    )
    .await;
    let until = Instant::now() + WAIT;
    while state_of(srv.devices().await).0 != Some("downloading") {
        assert!(Instant::now() < until, "the new session is no longer heard");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_in_enrollment_is_a_bad_request_and_nothing_is_stored() {
    let mut srv = Server::start().await;
    let token = srv.enrollment_token.clone();
    let cases = [
        ("../../etc", "hw-1"),
        (DEVICE_TYPE, "../../etc/passwd"),
        ("gateway/../../x", "hw-2"),
        ("..", "hw-3"),
        (DEVICE_TYPE, "/etc/passwd"),
        (DEVICE_TYPE, "hw\u{0}nul"),
        ("", "hw-4"),
    ];
    let long_type = "a".repeat(65);
    let all = cases.iter().copied().chain([(long_type.as_str(), "hw-5")]);
    for (device_type, hw) in all {
        let (mut ws, nonce) = srv.channel().await;
        send_text(
            &mut ws,
            Identity::new().enroll_frame(&nonce, &token, device_type, hw),
        )
        .await;
        let err = expect_refusal(&mut ws, ErrorKind::BadRequest).await;
        assert!(
            err.message.contains("device type") || err.message.contains("hardware id"),
            "says which field is wrong: {err}"
        );
    }
    // The same for a device ID.
    let (mut ws, nonce) = srv.channel().await;
    send_text(
        &mut ws,
        Identity::new().authenticate_frame(&nonce, "../../etc/passwd"),
    )
    .await;
    expect_refusal(&mut ws, ErrorKind::BadRequest).await;

    srv.assert_unaffected().await;
    assert!(!srv.root.join("etc").exists() && !srv.root.join("data/etc").exists());
    assert_eq!(
        std::fs::read_to_string(srv.root.join("passwd")).unwrap(),
        SECRET
    );
}

// ---------------------------------------------------------------- HTTP

/// Every admin endpoint, with a body it parses where it takes one, and the
/// permission it needs.
fn admin_endpoints() -> Vec<(reqwest::Method, String, &'static str, Permission)> {
    use reqwest::Method;
    use Permission::*;
    let some_device: DeviceId = "dev-0123456789abcdef".parse().unwrap();
    vec![
        (Method::GET, DEVICES_PATH.into(), "", Read),
        (Method::GET, device_path(&some_device), "", Read),
        (
            Method::PUT,
            device_tags_path(&some_device),
            r#"{"add":["canary"]}"#,
            Operate,
        ),
        (Method::GET, device_history_path(&some_device), "", Read),
        (Method::GET, RELEASES_PATH.into(), "", Read),
        (Method::POST, RELEASES_PATH.into(), "{}", Release),
        (
            Method::POST,
            MISSING_CHUNKS_PATH.into(),
            r#"{"chunks":[]}"#,
            Release,
        ),
        (Method::PUT, admin_chunk_path(&sha256(b"x")), "x", Release),
        (
            Method::PUT,
            format!("/api/v1/patches/{}", sha256(b"x")),
            "x",
            Release,
        ),
        (
            Method::PUT,
            format!("/api/v1/indexes/{}", sha256(b"x")),
            "x",
            Release,
        ),
        (Method::GET, ROLLOUTS_PATH.into(), "", Read),
        (
            Method::POST,
            ROLLOUTS_PATH.into(),
            r#"{"release":"1.0","devices":null}"#,
            Operate,
        ),
        (
            Method::POST,
            ROLLOUT_PREVIEW_PATH.into(),
            r#"{"release":"1.0","devices":null}"#,
            Operate,
        ),
        (Method::GET, FLEET_PATH.into(), "", Read),
        (Method::GET, "/api/v1/rollouts/1".into(), "", Read),
        (Method::POST, "/api/v1/rollouts/1/pause".into(), "", Operate),
        (Method::POST, "/api/v1/rollouts/1/abort".into(), "", Operate),
        (Method::POST, "/api/v1/rollouts/1/retry".into(), "", Operate),
        (Method::GET, STATS_PATH.into(), "", Read),
        (Method::GET, METRICS_PATH.into(), "", Read),
        (Method::GET, WHOAMI_PATH.into(), "", Read),
        (Method::GET, TOKENS_PATH.into(), "", Administer),
        (
            Method::POST,
            TOKENS_PATH.into(),
            r#"{"name":"made-by-test","role":"viewer"}"#,
            Administer,
        ),
        (Method::DELETE, format!("{TOKENS_PATH}/999"), "", Administer),
        (Method::GET, AUDIT_PATH.into(), "", Administer),
        (
            Method::GET,
            "/api/v1/events?subject=device".into(),
            "",
            Read,
        ),
        (Method::GET, "/api/v1/webhooks".into(), "", Administer),
        (
            Method::POST,
            "/api/v1/webhooks".into(),
            r#"{"url":"http://127.0.0.1:9/hook"}"#,
            Administer,
        ),
        (
            Method::DELETE,
            "/api/v1/webhooks/999".into(),
            "",
            Administer,
        ),
        (
            Method::GET,
            "/api/v1/webhooks/1/deliveries".into(),
            "",
            Administer,
        ),
    ]
}

impl Server {
    /// A new API token with `role`, made through the API by the admin.
    async fn token(&self, name: &str, role: Role, expires_in_secs: Option<u64>) -> TokenCreated {
        let resp = self
            .admin(reqwest::Method::POST, TOKENS_PATH)
            .json(&json!({"name": name, "role": role, "expires_in_secs": expires_in_secs}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        resp.json().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_refuse_missing_wrong_revoked_and_expired_tokens() {
    let mut srv = Server::start().await;
    let revoked = srv.token("revoked", Role::Admin, None).await;
    let resp = srv
        .admin(
            reqwest::Method::DELETE,
            &format!("{TOKENS_PATH}/{}", revoked.token.id),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let expired = srv.token("expired", Role::Admin, Some(1)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let wrong: [Option<String>; 9] = [
        None,
        Some("Bearer wrong-token".into()),
        Some(format!("Bearer {}", srv.enrollment_token)),
        Some(format!("Basic {}", srv.admin_token)),
        Some(format!("Bearer {}x", srv.admin_token)),
        Some("Bearer ".into()),
        Some(format!("Bearer {}", revoked.secret)),
        Some(format!("Bearer {}", expired.secret)),
        Some(format!("Bearer {}0", expired.secret)),
    ];
    for (method, path, body, _) in admin_endpoints() {
        for auth in &wrong {
            let mut req = srv.request(method.clone(), &path).body(body.to_string());
            if let Some(auth) = auth {
                req = req.header(reqwest::header::AUTHORIZATION, auth);
            }
            let resp = req.send().await.unwrap();
            let err = json_error(resp, 401, ErrorKind::Unauthorized).await;
            assert!(!err.message.contains(&srv.admin_token), "{err}");
        }
    }
    // The right token works, and nothing was created by the refused requests.
    assert!(srv.releases().await.is_empty());
    let resp = srv
        .admin(reqwest::Method::GET, ROLLOUTS_PATH)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.json::<Vec<RolloutView>>().await.unwrap().is_empty());
    let resp = srv
        .admin(reqwest::Method::GET, TOKENS_PATH)
        .send()
        .await
        .unwrap();
    let names: Vec<String> = resp
        .json::<Vec<TokenView>>()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert_eq!(names, ["revoked", "expired"]);
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_endpoint_refuses_a_role_too_low_for_it() {
    let mut srv = Server::start().await;
    for role in Role::iter() {
        let token = srv.token(&format!("as-{role}"), role, None).await;
        for (method, path, body, needs) in admin_endpoints() {
            let resp = srv
                .request(method.clone(), &path)
                .bearer_auth(&token.secret)
                .body(body)
                .send()
                .await
                .unwrap();
            let what = format!("{method} {path} as {role}");
            if role.allows(needs) {
                let status = resp.status().as_u16();
                assert!(
                    status != 401 && status != 403,
                    "{what}: {status} {}",
                    resp.text().await.unwrap_or_default()
                );
            } else {
                let err = json_error(resp, 403, ErrorKind::Forbidden).await;
                assert!(
                    err.message.contains(&format!("has role {role}")),
                    "{what}: {err}"
                );
            }
        }
    }
    // Refused requests changed nothing: no release, no rollout, and the only
    // tokens made by the endpoint test are the admin's.
    assert!(srv.releases().await.is_empty());
    let resp = srv
        .admin(reqwest::Method::GET, TOKENS_PATH)
        .send()
        .await
        .unwrap();
    let tokens: Vec<TokenView> = resp.json().await.unwrap();
    let made_by_test = tokens.iter().filter(|t| t.name.as_str() == "made-by-test");
    assert!(made_by_test
        .clone()
        .all(|t| t.created_by.contains("as-admin")));
    assert_eq!(made_by_test.count(), 1);
    srv.assert_unaffected().await;
}

/// A client that sends its headers, then its body, then reads the answer
/// (Python's `requests`, curl) must get the refusal, not a reset: the
/// server answers before it reads a body it refuses, and closing the
/// connection then with the body still arriving would make the client's
/// kernel throw the answer away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_answered_while_its_body_is_still_arriving() {
    let mut srv = Server::start().await;
    let viewer = srv.token("slow-sender", Role::Viewer, None).await;
    let body = format!(
        r#"{{"url":"https://example.com/hook","note":"{}"}}"#,
        "x".repeat(16 * 1024)
    );
    let mut tls = srv.tls().await;
    let head = format!(
        "POST /api/v1/webhooks HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        viewer.secret,
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    // The refusal is decided on the headers; give the server time to send it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for piece in body.as_bytes().chunks(1024) {
        tls.write_all(piece)
            .await
            .expect("the server still takes the body it refused");
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut raw = Vec::new();
    timeout(WAIT, async {
        let mut buf = [0u8; 8192];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) => panic!("the answer was lost: {e} after {} bytes", raw.len()),
            }
        }
    })
    .await
    .expect("the server closes the connection after its answer");
    RawResponse::parse(&raw).json_error(403, ErrorKind::Forbidden);
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_tag_and_history_requests_refuse_bad_input_clearly() {
    use reqwest::Method;
    let mut srv = Server::start().await;
    let dev = srv.enroll().await;
    let id = dev.device_id.clone();
    let unknown: DeviceId = "dev-0000000000000000".parse().unwrap();
    // Each refused with 400 and a message naming what is wrong.
    let bad_lists = [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("after=..%2Fetc", "after"),
        ("after=dev%20x", "after"),
        ("tag=a%20b", "tag"),
        ("tag=a,b", "tag"),
        ("tag=a&tag=b", "tag"),
        ("state=asleep", "asleep"),
        ("online=maybe", "online"),
        ("version=..%2F1", "version"),
        ("device_type=a%2Fb", "device type"),
        ("seen_before=yesterday", "seen_before"),
        ("seen_after=2026-02-30T00:00:00Z", "seen_after"),
        ("colour=red", "colour"),
    ];
    let long_search = format!("q={}", "x".repeat(200));
    for (query, named) in bad_lists
        .iter()
        .copied()
        .chain([(long_search.as_str(), "q")])
    {
        let resp = srv
            .admin(Method::GET, &format!("{DEVICES_PATH}?{query}"))
            .send()
            .await
            .unwrap();
        let err = json_error(resp, 400, ErrorKind::BadRequest).await;
        assert!(err.message.contains(named), "{query}: {err}");
    }
    for body in [
        r#"{"add":["a b"]}"#,
        r#"{"add":["../x"]}"#,
        r#"{"remove":[""]}"#,
        r#"{"tags":["a"]}"#,
        r#"{"add":"canary"}"#,
        "not json",
    ] {
        let resp = srv
            .admin(Method::PUT, &device_tags_path(&id))
            .body(body)
            .send()
            .await
            .unwrap();
        json_error(resp, 400, ErrorKind::BadRequest).await;
    }
    let too_many: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
    let resp = srv
        .admin(Method::PUT, &device_tags_path(&id))
        .json(&json!({ "add": too_many }))
        .send()
        .await
        .unwrap();
    let err = json_error(resp, 400, ErrorKind::BadRequest).await;
    assert!(err.message.contains("40 tags"), "{err}");
    for query in ["limit=0", "limit=5000", "before=0", "before=x", "after=3"] {
        let resp = srv
            .admin(
                Method::GET,
                &format!("{}?{query}", device_history_path(&id)),
            )
            .send()
            .await
            .unwrap();
        json_error(resp, 400, ErrorKind::BadRequest).await;
    }
    // A device ID that is not one, and one that is not enrolled.
    for path in [
        "/api/v1/devices/dev%20x",
        "/api/v1/devices/..%2F..%2Fpasswd/history",
    ] {
        let resp = srv.admin(Method::GET, path).send().await.unwrap();
        json_error(resp, 400, ErrorKind::BadRequest).await;
    }
    for (method, path, body) in [
        (Method::GET, device_path(&unknown), ""),
        (Method::GET, device_history_path(&unknown), ""),
        (
            Method::PUT,
            device_tags_path(&unknown),
            r#"{"add":["canary"]}"#,
        ),
    ] {
        let resp = srv.admin(method, &path).body(body).send().await.unwrap();
        let err = json_error(resp, 404, ErrorKind::NotFound).await;
        assert!(err.message.contains(unknown.as_str()), "{err}");
    }
    // Nothing refused changed anything; the right requests work.
    let resp = srv
        .admin(Method::GET, &device_path(&id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.json::<DeviceView>().await.unwrap().tags.is_empty());
    let resp = srv
        .admin(Method::PUT, &device_tags_path(&id))
        .json(&json!({ "add": ["canary", "site:berlin"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = srv
        .admin(
            Method::GET,
            &format!("{DEVICES_PATH}?tag=site:berlin&online=true&limit=1"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let page: DevicePage = resp.json().await.unwrap();
    assert_eq!(page.devices.len(), 1);
    assert_eq!(page.devices[0].id, id);
    assert_eq!(page.devices[0].tags.len(), 2);
    let resp = srv
        .admin(Method::GET, &device_history_path(&id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<DeviceHistory>().await.unwrap().device, id);
    drop(dev);
    srv.assert_unaffected().await;
}

/// Download tokens are renewed on the channel before they expire, for an
/// agent that takes `download_token` frames; an older agent's channel is
/// closed instead, and its reconnect brings a fresh token. A lifetime of
/// 60 s is renewed at the first 20 s ping tick past half of it: this test
/// takes about 40 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_tokens_are_renewed_before_they_expire() {
    // A table of its own after the (empty) `[limits]` the harness writes.
    let mut srv = Server::start_with_limits(Some("[download_tokens]\nlifetime_secs = 60")).await;
    let identity = Identity::new();
    let (mut ws, nonce) = srv.channel().await;
    let mut hello: serde_json::Value = serde_json::from_str(&identity.enroll_frame(
        &nonce,
        &srv.enrollment_token,
        DEVICE_TYPE,
        &srv.hardware_id(),
    ))
    .unwrap();
    hello["features"] = json!(["hold_reboot", "token_renewal"]);
    send_text(&mut ws, hello.to_string()).await;
    let (device_id, first) = match recv(&mut ws).await {
        ServerMsg::Welcome {
            device_id,
            session_token,
            ..
        } => (device_id, session_token),
        other => panic!("expected a welcome, got {other:?}"),
    };
    srv.legit
        .lock()
        .unwrap()
        .insert(device_id.as_str().to_owned());
    // An agent from before token renewal (no features).
    let mut older = srv.enroll().await;
    let started = Instant::now();
    let limit = Duration::from_secs(60);
    let renewed = async {
        loop {
            let frame = timeout(limit, ws.next())
                .await
                .expect("a renewal before the token expires")
                .expect("the channel stays open")
                .expect("the channel is readable");
            let Message::Text(text) = frame else { continue };
            match channel::decode::<ServerMsg>(text.as_str()).unwrap() {
                ServerMsg::DownloadToken {
                    token,
                    expires_in_secs,
                } => return (token, expires_in_secs, started.elapsed()),
                ServerMsg::NoUpdate => continue,
                other => panic!("expected a download_token frame, got {other:?}"),
            }
        }
    };
    let closed = async {
        let closed = timeout(limit, async {
            while let Some(Ok(frame)) = older.ws.next().await {
                if let Message::Close(_) = frame {
                    return;
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "an older agent's channel is closed for it to reconnect"
        );
        started.elapsed()
    };
    let ((token, expires_in_secs, renewed_after), closed_after) = tokio::join!(renewed, closed);
    eprintln!(
        "renewed after {:.1} s, older agent's channel closed after {:.1} s",
        renewed_after.as_secs_f64(),
        closed_after.as_secs_f64()
    );
    assert!(
        renewed_after >= Duration::from_secs(25),
        "not before half the lifetime"
    );
    assert!((55..=60).contains(&expires_in_secs), "{expires_in_secs}");
    assert_ne!(token, first);
    // Both tokens work: the first until it expires, the new one for a minute.
    for token in [&first, &token] {
        let resp = srv
            .request(
                reqwest::Method::GET,
                uplift_proto::api::DEVICE_AUTHORIZE_PATH,
            )
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
    }
    // The older agent comes back and is given a fresh token.
    let (_back, fresh) = srv.authenticate(&older.identity, &older.device_id).await;
    assert_ne!(fresh, older.session_token);
    drop(ws);
    srv.assert_unaffected().await;
}

/// Download tokens are signed: valid on any replica until they expire,
/// whether or not their channel is still open (they were once kept in
/// memory and revoked with it), and refused with a kind that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_downloads_need_a_valid_download_token() {
    use uplift_server::download_token::{unix_now, Keyring};
    let mut srv = Server::start().await;
    let (hash, stored) = srv.store_chunk(&[5u8; 3000]).await;
    let chunk = device_chunk_path(&hash);
    let manifest = "/v1/device/releases/1.0/manifest";
    let live = srv.enroll().await;
    let mut ended = srv.enroll().await;
    let ended_token = ended.session_token.clone();
    let _ = ended.ws.close(None).await;
    drop(ended);
    // The channel is gone; its token still works until it expires.
    let deadline = Instant::now() + WAIT;
    while srv.devices().await.iter().filter(|d| d.online).count() > 1 {
        assert!(
            Instant::now() < deadline,
            "the closed channel is still online"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = srv
        .request(reqwest::Method::GET, &chunk)
        .bearer_auth(&ended_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "a token is valid until its expiry");

    // Tokens signed with the server's own key, but expired or naming a
    // device that is not enrolled; one signed with a key it does not hold.
    let key_file = srv.root.join("data/download-token-keys");
    let keys = Keyring::parse(&std::fs::read_to_string(&key_file).unwrap(), &key_file).unwrap();
    let now = unix_now();
    let expired = keys.sign(&live.device_id, now - 1_000, 600).text;
    let stranger = keys
        .sign(&"dev-not-enrolled".parse().unwrap(), now, 600)
        .text;
    let foreign = Keyring::parse(&Keyring::generate_file_text(), Path::new("other"))
        .unwrap()
        .sign(&live.device_id, now, 600)
        .text;
    let other_device = live
        .session_token
        .replace(live.device_id.as_str(), "dev-0000000000000000");
    let invalid = ErrorKind::DownloadTokenInvalid;
    let wrong = [
        (None, ErrorKind::Unauthorized),
        // The token without its scheme: no bearer token at all.
        (Some(live.session_token.clone()), ErrorKind::Unauthorized),
        (Some("Bearer not-a-session".to_owned()), invalid),
        (Some(format!("Bearer {}", srv.admin_token)), invalid),
        (Some(format!("Bearer {}", srv.enrollment_token)), invalid),
        (Some(format!("Bearer {other_device}")), invalid),
        (Some(format!("Bearer {stranger}")), invalid),
        (Some(format!("Bearer {foreign}")), invalid),
        (
            Some(format!("Bearer {expired}")),
            ErrorKind::DownloadTokenExpired,
        ),
    ];
    for path in [
        chunk.as_str(),
        manifest,
        "/v1/device/chunks/..%2F..%2Fsecret",
        uplift_proto::api::DEVICE_AUTHORIZE_PATH,
    ] {
        for (auth, kind) in &wrong {
            let mut req = srv.request(reqwest::Method::GET, path);
            if let Some(auth) = auth {
                req = req.header(reqwest::header::AUTHORIZATION, auth);
            }
            let said = json_error(req.send().await.unwrap(), 401, *kind).await;
            assert!(!said.message.contains(&srv.admin_token), "{said}");
        }
    }
    // The live token does work.
    let resp = srv
        .request(reqwest::Method::GET, &chunk)
        .bearer_auth(&live.session_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), stored.as_slice());
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_in_urls_never_reaches_outside_the_data_dir() {
    let mut srv = Server::start().await;
    let dev = srv.enroll().await;
    let auth = format!("Authorization: Bearer {}", dev.session_token);
    let admin = format!("Authorization: Bearer {}", srv.admin_token);
    let bad_request = [
        "/v1/device/chunks/..%2F..%2Fetc%2Fpasswd",
        "/v1/device/chunks/..%2F..%2Fsecret",
        "/v1/device/chunks/..%2F..%2F..%2Fsecret",
        "/v1/device/chunks/%2e%2e",
        "/v1/device/chunks/%2Fetc%2Fpasswd",
        "/v1/device/chunks/ZZZ",
        "/v1/device/chunks/%00",
        "/v1/device/releases/..%2F..%2Fsecret/manifest",
        "/v1/device/releases/%2e%2e/manifest",
    ];
    for target in bad_request {
        srv.raw_http(&format!("GET {target} HTTP/1.1\r\n{auth}"), b"")
            .await
            .json_error(400, ErrorKind::BadRequest);
    }
    let upper = format!("/v1/device/chunks/{}", sha256(b"x").to_hex().to_uppercase());
    srv.raw_http(&format!("GET {upper} HTTP/1.1\r\n{auth}"), b"")
        .await
        .json_error(400, ErrorKind::BadRequest);
    // Not normalized by anyone: such paths match no route.
    for target in [
        "/v1/device/chunks/../../secret",
        "/v1/device/chunks/../../../secret",
        "/v1/device/releases/../../../secret/manifest",
        "/v1/device/chunks/ab/../../../secret",
        "/../../secret",
    ] {
        srv.raw_http(&format!("GET {target} HTTP/1.1\r\n{auth}"), b"")
            .await
            .json_error(404, ErrorKind::NotFound);
    }
    // A path that is not UTF-8 once decoded.
    srv.raw_http(
        &format!("GET /v1/device/chunks/%FF%FE HTTP/1.1\r\n{auth}"),
        b"",
    )
    .await
    .json_error(400, ErrorKind::BadRequest);
    srv.raw_http(
        &format!("PUT /api/v1/chunks/%FF%FE HTTP/1.1\r\n{admin}"),
        b"x",
    )
    .await
    .json_error(400, ErrorKind::BadRequest);
    // Uploads under hostile names are refused and write nothing.
    for target in [
        "/api/v1/chunks/ZZZ",
        "/api/v1/chunks/..%2F..%2Fsecret",
        "/api/v1/chunks/..%2F..%2F..%2Fpwned",
    ] {
        srv.raw_http(&format!("PUT {target} HTTP/1.1\r\n{admin}"), b"pwned")
            .await
            .json_error(400, ErrorKind::BadRequest);
    }
    srv.raw_http(
        &format!("GET /api/v1/rollouts/..%2F1 HTTP/1.1\r\n{admin}"),
        b"",
    )
    .await
    .json_error(400, ErrorKind::BadRequest);
    assert_eq!(
        std::fs::read_to_string(srv.root.join("secret")).unwrap(),
        SECRET
    );
    let mut entries: Vec<String> = std::fs::read_dir(&srv.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["data", "passwd", "ready.json", "secret", "server.log"],
        "nothing was written outside the data dir"
    );
    srv.assert_unaffected().await;
}

impl Server {
    /// Uploads a valid chunk of `data`; returns its name and stored bytes.
    async fn store_chunk(&self, data: &[u8]) -> (ChunkHash, Vec<u8>) {
        let hash = sha256(data);
        let stored = encode_chunk(data).unwrap();
        let resp = self.put_chunk(&hash.to_hex(), stored.clone()).await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        (hash, stored)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_does_not_match_its_name_is_not_stored() {
    let mut srv = Server::start().await;
    let dev = srv.enroll().await;
    let claimed = sha256(b"the bytes the name promises");
    let name = claimed.to_hex();
    let bodies: [(&str, Vec<u8>); 3] = [
        (
            "other data",
            encode_chunk(b"some other bytes entirely").unwrap(),
        ),
        ("not zstd", b"definitely not a zstd frame".to_vec()),
        ("empty", Vec::new()),
    ];
    for (what, body) in bodies {
        let err = json_error(
            srv.put_chunk(&name, body).await,
            422,
            ErrorKind::ChunkHashMismatch,
        )
        .await;
        assert!(
            err.message.contains(&name),
            "{what}: names the chunk: {err}"
        );
    }
    assert_eq!(
        srv.missing(&[claimed]).await,
        vec![claimed],
        "still missing"
    );
    let resp = srv
        .request(reqwest::Method::GET, &device_chunk_path(&claimed))
        .bearer_auth(&dev.session_token)
        .send()
        .await
        .unwrap();
    json_error(resp, 404, ErrorKind::NotFound).await;
    // The right bytes are accepted, and only once stored.
    let (hash, _) = srv.store_chunk(b"the bytes the name promises").await;
    assert_eq!(hash, claimed);
    assert!(srv.missing(&[claimed]).await.is_empty());
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_body_over_the_limit_is_refused() {
    let mut srv = Server::start().await;
    // Over the largest stored size a chunk can have (but under the body limit).
    let name = sha256(b"big").to_hex();
    let big: Vec<u8> = (0..2 * 1024 * 1024u32)
        .map(|i| (i * 7 + i / 13) as u8)
        .collect();
    json_error(
        srv.put_chunk(&name, big).await,
        413,
        ErrorKind::PayloadTooLarge,
    )
    .await;
    // A small body that decompresses to more than any chunk may hold.
    let zeros = vec![0u8; 2 * 1024 * 1024];
    let bomb = encode_chunk(&zeros).unwrap();
    assert!(bomb.len() < 64 * 1024);
    json_error(
        srv.put_chunk(&sha256(&zeros).to_hex(), bomb).await,
        413,
        ErrorKind::PayloadTooLarge,
    )
    .await;
    // Over the request body limit itself.
    let huge = vec![1u8; MAX_MANIFEST_BYTES + 1024 * 1024];
    let head = format!(
        "PUT /api/v1/chunks/{name} HTTP/1.1\r\nAuthorization: Bearer {}",
        srv.admin_token
    );
    srv.raw_http(&head, &huge)
        .await
        .json_error(413, ErrorKind::PayloadTooLarge);
    let hashes = [sha256(b"big"), sha256(&zeros)];
    assert_eq!(
        srv.missing(&hashes).await,
        hashes.to_vec(),
        "nothing stored"
    );
    srv.assert_unaffected().await;
}

fn manifest_for(version: &str, chunks: &[&[u8]]) -> Manifest {
    let image: Vec<u8> = chunks.concat();
    Manifest {
        format: MANIFEST_FORMAT,
        version: version.parse().unwrap(),
        device_type: DEVICE_TYPE.parse().unwrap(),
        created_at: "2025-01-01T00:00:00Z".to_owned(),
        expires_at: "2100-01-01T00:00:00Z".to_owned(),
        image: ImageInfo {
            size: image.len() as u64,
            sha256: sha256(&image),
        },
        compression: Compression::Zstd,
        chunks: chunks
            .iter()
            .map(|data| ChunkEntry {
                hash: sha256(data),
                size: data.len() as u32,
                stored_size: encode_chunk(data).unwrap().len() as u32,
            })
            .collect(),
        chunk_index: None,
        patches: Vec::new(),
        may_replace_up_to: None,
    }
}

/// A manifest the server must judge on its own (it holds no release keys).
fn unsigned(manifest: &Manifest) -> Vec<u8> {
    SignedManifest {
        signed: serde_json::to_string(manifest).unwrap(),
        signatures: Vec::new(),
    }
    .to_json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_or_incomplete_releases_are_refused() {
    let mut srv = Server::start().await;
    let a = vec![1u8; 4000];
    let b = vec![2u8; 3000];
    srv.store_chunk(&a).await;
    srv.store_chunk(&b).await;
    let post = |body: Vec<u8>| {
        srv.admin(reqwest::Method::POST, RELEASES_PATH)
            .body(body)
            .send()
    };

    let mut wrong_size = manifest_for("1.0", &[&a, &b]);
    wrong_size.image.size += 1;
    let err = json_error(
        post(unsigned(&wrong_size)).await.unwrap(),
        400,
        ErrorKind::ManifestInvalid,
    )
    .await;
    assert!(
        err.message.contains("7000") && err.message.contains("7001"),
        "{err}"
    );

    let lacking = manifest_for("1.0", &[&a, b"a chunk never uploaded"]);
    let err = json_error(
        post(unsigned(&lacking)).await.unwrap(),
        409,
        ErrorKind::Conflict,
    )
    .await;
    assert!(err.message.contains("1 chunks"), "{err}");

    let mut wrong_stored = manifest_for("1.0", &[&a, &b]);
    wrong_stored.chunks[1].stored_size += 1;
    json_error(
        post(unsigned(&wrong_stored)).await.unwrap(),
        409,
        ErrorKind::Conflict,
    )
    .await;

    let traversal = serde_json::to_string(&manifest_for("1.0", &[&a]))
        .unwrap()
        .replace("\"1.0\"", "\"../../etc\"");
    let body = serde_json::to_vec(&json!({ "signed": traversal, "signatures": [] })).unwrap();
    json_error(post(body).await.unwrap(), 400, ErrorKind::ManifestInvalid).await;

    for garbage in [
        &b"{not json"[..],
        b"",
        b"[]",
        b"{\"signed\": 5}",
        &[0xff, 0xfe],
    ] {
        json_error(
            post(garbage.to_vec()).await.unwrap(),
            400,
            ErrorKind::ManifestInvalid,
        )
        .await;
    }
    assert!(srv.releases().await.is_empty(), "no release stored");

    // The complete, valid release is accepted (so the refusals above are not
    // just a broken endpoint); the same release again is a harmless repair,
    // but another manifest under its version conflicts: releases are immutable.
    let key = ReleaseSigningKey::generate();
    let good = sign_manifest(&manifest_for("1.0", &[&a, &b]), &key).unwrap();
    let resp = post(good.to_json()).await.unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let resp = post(good.to_json()).await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let other = sign_manifest(&manifest_for("1.0", &[&b, &a]), &key).unwrap();
    let err = json_error(
        post(other.to_json()).await.unwrap(),
        409,
        ErrorKind::Conflict,
    )
    .await;
    assert!(err.message.contains("immutable"), "{err}");
    assert_eq!(srv.releases().await.len(), 1);
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_json_bodies_are_bad_requests() {
    let mut srv = Server::start().await;
    let garbage: [&[u8]; 7] = [
        b"{not json",
        b"",
        b"[1,2",
        b"null",
        b"{\"chunks\": \"nope\"}",
        &[0xff, 0xfe, 0x00],
        b"{\"chunks\": [\"../../etc/passwd\"]}",
    ];
    for body in garbage {
        let resp = srv
            .admin(reqwest::Method::POST, MISSING_CHUNKS_PATH)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        json_error(resp, 400, ErrorKind::BadRequest).await;
    }
    let rollouts: [&[u8]; 5] = [
        b"{not json",
        b"",
        b"{\"release\": \"../../etc\"}",
        b"{\"release\": \"1.0\", \"devices\": [\"../x\"]}",
        b"{\"release\": 5}",
    ];
    for body in rollouts {
        let resp = srv
            .admin(reqwest::Method::POST, ROLLOUTS_PATH)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        json_error(resp, 400, ErrorKind::BadRequest).await;
    }
    let resp = srv
        .admin(reqwest::Method::GET, "/api/v1/rollouts/not-a-number")
        .send()
        .await
        .unwrap();
    json_error(resp, 400, ErrorKind::BadRequest).await;
    // A method an endpoint does not take.
    for (method, path) in [
        (reqwest::Method::DELETE, DEVICES_PATH),
        (reqwest::Method::PUT, ROLLOUTS_PATH),
        (reqwest::Method::POST, HEALTH_PATH),
    ] {
        let resp = srv.admin(method.clone(), path).send().await.unwrap();
        let allow = resp.headers().get(reqwest::header::ALLOW).cloned();
        json_error(resp, 405, ErrorKind::BadRequest).await;
        assert!(allow.is_some(), "{method} {path}: 405 says what is allowed");
    }
    // A WebSocket endpoint hit without the upgrade.
    let resp = srv
        .request(reqwest::Method::GET, CHANNEL_PATH)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert!(status == 400 || status == 426, "got {status}");
    json_error(
        resp,
        status,
        if status == 426 {
            ErrorKind::UnsupportedProtocol
        } else {
            ErrorKind::BadRequest
        },
    )
    .await;
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_beyond_the_chunk_is_not_satisfiable() {
    let mut srv = Server::start().await;
    let (hash, stored) = srv.store_chunk(&[9u8; 5000]).await;
    let len = stored.len();
    let dev = srv.enroll().await;
    let get = |range: String| {
        srv.request(reqwest::Method::GET, &device_chunk_path(&hash))
            .bearer_auth(&dev.session_token)
            .header(reqwest::header::RANGE, range)
            .send()
    };
    for range in [
        format!("bytes={len}-"),
        format!("bytes={}-{}", len + 100, len + 200),
        "bytes=99999999999-".to_owned(),
        "bytes=5-2".to_owned(),
        "bytes=18446744073709551615-".to_owned(),
    ] {
        let resp = get(range.clone()).await.unwrap();
        let content_range = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            content_range.as_deref(),
            Some(format!("bytes */{len}").as_str()),
            "{range}"
        );
        json_error(resp, 416, ErrorKind::BadRequest).await;
    }
    // A satisfiable range still works.
    let resp = get("bytes=2-5".to_owned()).await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &stored[2..6]);
    srv.assert_unaffected().await;
}

// ---------------------------------------------------------------- connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_starve_real_devices() {
    let mut srv = Server::start().await;
    let mut idle_tls = Vec::new();
    for _ in 0..200 {
        idle_tls.push(srv.tls().await);
    }
    let mut idle_tcp = Vec::new();
    for _ in 0..50 {
        idle_tcp.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    for _ in 0..50 {
        let mut tls = srv.tls().await;
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        tls.flush().await.unwrap();
        idle_tls.push(tls);
    }
    let started = Instant::now();
    srv.assert_unaffected().await;
    let resp = srv
        .request(reqwest::Method::GET, HEALTH_PATH)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a device was served in {:?} beside 300 idle connections",
        started.elapsed()
    );
    drop(idle_tls);
    drop(idle_tcp);
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_ask_for_http2_get_it_and_the_rest_speak_http1() {
    let mut srv = Server::start().await;
    // reqwest offers h2 and http/1.1 by ALPN, as the agent and the CLI do.
    let resp = srv
        .request(reqwest::Method::GET, "/healthz")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (resp.version(), resp.status().as_u16()),
        (reqwest::Version::HTTP_2, 200)
    );
    // Errors keep their JSON shape over HTTP/2.
    let resp = srv
        .request(reqwest::Method::GET, "/v1/device/chunks/not-a-hash")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    json_error(resp, 401, ErrorKind::Unauthorized).await;
    // No ALPN: HTTP/1.1, and the device channel (a WebSocket upgrade) too.
    let raw = srv.raw_http("GET /healthz HTTP/1.1", b"").await;
    assert_eq!(raw.status, 200);
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_dropped_so_a_full_server_recovers() {
    // Few connection slots and a short handshake deadline: idle clients must
    // be cut off, or they would hold every slot forever.
    let mut srv =
        Server::start_with_limits(Some("max_connections = 20\nhandshake_timeout_secs = 1")).await;
    let tls = srv.tls.clone();
    // A third of them ask for HTTP/2, which has no header deadline of its
    // own: they must be cut off all the same.
    let tls_h2 = {
        let mut config = (*srv.tls).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    };
    let addr = srv.addr;
    let mut idle = Vec::new();
    for i in 0..100 {
        let h2 = i % 3 == 2;
        let tls = if h2 { tls_h2.clone() } else { tls.clone() };
        idle.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let mut stream = match timeout(
                WAIT * 2,
                tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                // Cut off during the TLS handshake: that is the server
                // enforcing its deadline.
                Ok(Err(_)) => return true,
                Err(_) => return false,
            };
            assert_eq!(
                stream.get_ref().1.alpn_protocol(),
                h2.then_some(&b"h2"[..]),
                "the server speaks HTTP/2 to exactly the clients that ask for it"
            );
            if i % 2 == 0 {
                // Half an opening: HTTP/1.1 headers without their end, or
                // HTTP/2's preface without the rest.
                let half: &[u8] = if h2 {
                    b"PRI * HTTP/2.0\r\n"
                } else {
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                };
                let _ = stream.write_all(half).await;
                let _ = stream.flush().await;
            }
            // Now stay silent; the server must close the connection.
            let mut buf = [0u8; 1024];
            let closed = timeout(WAIT * 2, async {
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => continue,
                    }
                }
            })
            .await;
            closed.is_ok()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    timeout(Duration::from_secs(40), srv.assert_unaffected())
        .await
        .expect("a real device is served once idle connections time out");
    let took = started.elapsed();
    for task in idle {
        assert!(
            timeout(Duration::from_secs(60), task)
                .await
                .unwrap()
                .unwrap(),
            "the server closes a connection that stays silent"
        );
    }
    eprintln!("device served after {took:?} behind 100 idle connections");
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_channels_have_a_budget_of_their_own_and_starve_neither_downloads_nor_admin() {
    // Far more channels than HTTP connection slots: an open channel must not
    // hold the slot of the connection it was upgraded from.
    let mut srv =
        Server::start_with_limits(Some("max_connections = 4\nmax_device_channels = 12")).await;
    let mut devices = Vec::new();
    for _ in 0..12 {
        devices.push(
            timeout(WAIT, srv.enroll())
                .await
                .expect("a device channel is accepted while channels hold no HTTP connection slot"),
        );
    }

    // One channel too many: a clear refusal, not a hang.
    let url = format!("wss://{}{CHANNEL_PATH}", srv.addr);
    let refused = timeout(WAIT, tokio_tungstenite::client_async(url, srv.tls().await))
        .await
        .expect("the server answers an upgrade over the channel budget at once");
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            check_error_body(
                response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok()),
                response.body().as_deref().unwrap_or_default(),
                ErrorKind::ServerBusy,
            );
        }
        other => panic!("a 13th channel must get 503 server_busy, got {other:?}"),
    }

    // Admin calls and downloads are served beside twelve open channels.
    let listed = srv.devices().await;
    assert_eq!(listed.iter().filter(|d| d.online).count(), 12);
    let resp = srv
        .request(
            reqwest::Method::GET,
            &device_chunk_path(&sha256(b"not stored")),
        )
        .bearer_auth(&devices[0].session_token)
        .send()
        .await
        .unwrap();
    json_error(resp, 404, ErrorKind::NotFound).await;

    // A channel that closes gives its slot back.
    let mut gone = devices.pop().unwrap();
    let _ = gone.ws.close(None).await;
    drop(gone);
    let until = Instant::now() + WAIT;
    while srv.devices().await.iter().filter(|d| d.online).count() > 11 {
        assert!(Instant::now() < until, "a closed channel is never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _newcomer = srv.enroll().await;
    drop(devices);
    srv.assert_unaffected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_listener_the_device_address_serves_no_admin_api() {
    let mut srv = Server::start_with(None, &["--admin-listen", "127.0.0.1:0"]).await;
    let admin_url = srv
        .admin_url
        .clone()
        .expect("the ready file names the admin address");
    assert_ne!(admin_url, srv.url);
    // The admin API, with the right token, on the device address: not there.
    let resp = srv
        .request(reqwest::Method::GET, DEVICES_PATH)
        .bearer_auth(&srv.admin_token)
        .send()
        .await
        .unwrap();
    let err = json_error(resp, 404, ErrorKind::NotFound).await;
    assert!(err.message.contains("admin_listen"), "{err}");
    // Without a token, on the admin address.
    let anonymous = |path: &str| srv.http.get(format!("{admin_url}{path}")).send();
    // No device channel on the admin address.
    let resp = anonymous(CHANNEL_PATH).await.unwrap();
    json_error(resp, 404, ErrorKind::NotFound).await;
    // The API's document is on the admin address, without a token; the
    // device address, which serves no admin API, has none.
    let resp = anonymous(OPENAPI_PATH).await.unwrap();
    assert_eq!(resp.status(), 200);
    let document: serde_json::Value = resp.json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    assert!(document["paths"][DEVICES_PATH]["get"].is_object());
    let resp = srv
        .request(reqwest::Method::GET, OPENAPI_PATH)
        .send()
        .await
        .unwrap();
    json_error(resp, 404, ErrorKind::NotFound).await;
    // Public means the document only: the paths it lists still need a token.
    let resp = anonymous(DEVICES_PATH).await.unwrap();
    json_error(resp, 401, ErrorKind::Unauthorized).await;
    // Devices enroll on theirs, and the admin address lists them.
    srv.assert_unaffected().await;
    assert_eq!(srv.devices().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhooks_and_event_filters_are_refused_and_nothing_is_stored() {
    let mut srv = Server::start().await;
    use reqwest::Method;
    for (body, says) in [
        (r#"{"url":"ftp://127.0.0.1/x"}"#, "scheme"),
        (r#"{"url":"http://user:pw@127.0.0.1/x"}"#, "password"),
        (r#"{"url":"not a url"}"#, "not a URL"),
        (
            r#"{"url":"http://127.0.0.1/x","secret":"mine"}"#,
            "unknown field",
        ),
        (
            r#"{"url":"http://127.0.0.1/x","filter":{"subject":"planet"}}"#,
            "planet",
        ),
    ] {
        let resp = srv
            .admin(Method::POST, "/api/v1/webhooks")
            .body(body)
            .send()
            .await
            .unwrap();
        let err = json_error(resp, 400, ErrorKind::BadRequest).await;
        assert!(err.message.contains(says), "{body}: {err}");
    }
    for path in [
        "/api/v1/events?subject=planet",
        "/api/v1/events?rollout=abc",
        "/api/v1/events?device=../etc",
        "/api/v1/webhooks/abc/deliveries",
        "/api/v1/webhooks/1/deliveries?limit=0",
    ] {
        let resp = srv.admin(Method::GET, path).send().await.unwrap();
        json_error(resp, 400, ErrorKind::BadRequest).await;
    }
    let resp = srv
        .admin(Method::GET, "/api/v1/webhooks/7/deliveries")
        .send()
        .await
        .unwrap();
    json_error(resp, 404, ErrorKind::NotFound).await;
    let resp = srv
        .admin(Method::GET, "/api/v1/webhooks")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Vec<serde_json::Value>>().await.unwrap().len(),
        0
    );
    srv.assert_unaffected().await;
}
