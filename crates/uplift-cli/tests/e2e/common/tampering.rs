//! An attacker between devices and the real server who holds the server's
//! TLS key and certificate (a compromised server host, a stolen key, a
//! TLS-intercepting middlebox the devices were made to trust), but not the
//! server's online freshness key. It passes every byte on, reads the
//! device channel's frames, keeps every offer the server sends, and can
//! put a kept offer on any device's channel later: the replays and
//! transplants a device's freshness check exists to refuse.
//!
//! Everything else (enrollment, reports, downloads) reaches the real
//! server, so the operator sees what the device reports about the attack.

use futures_util::{SinkExt as _, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use uplift_proto::channel::{self, Offer, ServerMsg, CHANNEL_PATH};
use uplift_proto::DeviceId;

/// An HTTP request or response head is a few hundred bytes; this bounds it.
const MAX_HEAD_BYTES: usize = 16 * 1024;

pub struct TamperingRelay {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

struct Seen {
    /// Every offer the server sent, to whom, in order.
    offers: Mutex<Vec<(DeviceId, Offer)>>,
    /// The open channel of each device, to put frames on.
    channels: Mutex<HashMap<DeviceId, mpsc::UnboundedSender<ServerMsg>>>,
    /// Bumped to cut every open channel.
    cut: tokio::sync::watch::Sender<u64>,
}

impl TamperingRelay {
    /// Listens on loopback in front of the server at `upstream`, with the
    /// server's generated TLS material from `tls_dir` (`server.pem`,
    /// `server.key`, `ca.pem`).
    pub async fn start(upstream: SocketAddr, tls_dir: &Path) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_file_iter(tls_dir.join("server.pem"))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(tls_dir.join("server.key"))?;
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // HTTP/1.1 only, so every request head can be read on its way.
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(tls_dir.join("ca.pem"))? {
            roots.add(ca?)?;
        }
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Seen {
            offers: Mutex::default(),
            channels: Mutex::default(),
            cut: tokio::sync::watch::channel(0).0,
        });
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((device, _)) = listener.accept().await {
                let (acceptor, connector, seen) =
                    (acceptor.clone(), connector.clone(), shared.clone());
                tokio::spawn(async move {
                    // A connection that fails ends; the device reconnects.
                    let _ = relay(device, upstream, acceptor, connector, seen).await;
                });
            }
        });
        Ok(Self { addr, seen, task })
    }

    /// `https://` URL of the relay, to give devices as their server.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The offers the server has sent `device` so far, oldest first.
    pub fn offers_to(&self, device: &DeviceId) -> Vec<Offer> {
        self.seen
            .offers
            .lock()
            .unwrap()
            .iter()
            .filter(|(to, _)| to == device)
            .map(|(_, offer)| offer.clone())
            .collect()
    }

    /// Waits (bounded) until the server has sent `device` an offer of
    /// `version`, and returns it.
    pub async fn wait_offer(&self, device: &DeviceId, version: &str) -> Offer {
        let deadline = tokio::time::Instant::now() + super::WAIT;
        loop {
            let offers = self.offers_to(device);
            if let Some(offer) = offers.iter().find(|o| o.version.as_str() == version) {
                return offer.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server sent {device} no offer of {version} within {:?}; it sent {offers:#?}",
                super::WAIT
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Puts `msg` on `device`'s open channel as if the server had sent it.
    pub fn inject(&self, device: &DeviceId, msg: ServerMsg) {
        let channels = self.seen.channels.lock().unwrap();
        let channel = channels
            .get(device)
            .unwrap_or_else(|| panic!("{device} has no channel open through the relay"));
        channel
            .send(msg)
            .unwrap_or_else(|_| panic!("{device}'s channel closed"));
    }
}

impl TamperingRelay {
    /// Stops tampering for now: cuts every open channel, so each device
    /// reconnects and hears the server's own word again.
    pub fn cut_all(&self) {
        self.seen.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for TamperingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One device connection: TLS ended here and begun again to the server;
/// the device channel read frame by frame, anything else passed through.
async fn relay(
    device: TcpStream,
    upstream: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
    seen: Arc<Seen>,
) -> anyhow::Result<()> {
    let mut device = acceptor.accept(device).await?;
    let request = read_head(&mut device).await?;
    let server = TcpStream::connect(upstream).await?;
    let mut server = connector
        .connect(ServerName::IpAddress(upstream.ip().into()), server)
        .await?;
    server.write_all(&request).await?;
    let channel_request = request.starts_with(format!("GET {CHANNEL_PATH}").as_bytes());
    if !channel_request {
        tokio::io::copy_bidirectional(&mut device, &mut server).await?;
        return Ok(());
    }
    let answer = read_head(&mut server).await?;
    device.write_all(&answer).await?;
    if !answer.starts_with(b"HTTP/1.1 101") {
        tokio::io::copy_bidirectional(&mut device, &mut server).await?;
        return Ok(());
    }
    let device = WebSocketStream::from_raw_socket(device, Role::Server, None).await;
    let server = WebSocketStream::from_raw_socket(server, Role::Client, None).await;
    tamper(device, server, &seen).await;
    Ok(())
}

/// Reads one HTTP head, up to and including its blank line, byte by byte:
/// what follows it belongs to whoever reads next.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> anyhow::Result<Vec<u8>> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(head.len() < MAX_HEAD_BYTES, "HTTP head too long");
        head.push(stream.read_u8().await?);
    }
    Ok(head)
}

/// Carries one device channel's frames both ways, keeping the offers the
/// server sends and adding the frames injected for this device.
async fn tamper<D, S>(device: WebSocketStream<D>, server: WebSocketStream<S>, seen: &Seen)
where
    D: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut to_device, mut from_device) = device.split();
    let (mut to_server, mut from_server) = server.split();
    let (inject, mut injected) = mpsc::unbounded_channel::<ServerMsg>();
    let mut cut = seen.cut.subscribe();
    let mut device_id: Option<DeviceId> = None;
    loop {
        tokio::select! {
            _ = cut.changed() => break,
            frame = from_device.next() => {
                let Some(Ok(frame)) = frame else { break };
                if to_server.send(frame).await.is_err() {
                    break;
                }
            }
            frame = from_server.next() => {
                let Some(Ok(frame)) = frame else { break };
                if let Message::Text(text) = &frame {
                    match channel::decode::<ServerMsg>(text) {
                        Ok(ServerMsg::Welcome { device_id: id, .. }) => {
                            seen.channels.lock().unwrap().insert(id.clone(), inject.clone());
                            device_id = Some(id);
                        }
                        Ok(ServerMsg::Offer(offer)) => {
                            if let Some(id) = &device_id {
                                seen.offers.lock().unwrap().push((id.clone(), offer));
                            }
                        }
                        _ => {}
                    }
                }
                if to_device.send(frame).await.is_err() {
                    break;
                }
            }
            Some(msg) = injected.recv() => {
                if to_device.send(Message::text(channel::encode(&msg))).await.is_err() {
                    break;
                }
            }
        }
    }
    if let Some(id) = device_id {
        let mut channels = seen.channels.lock().unwrap();
        if channels.get(&id).is_some_and(|c| c.same_channel(&inject)) {
            channels.remove(&id);
        }
    }
}
