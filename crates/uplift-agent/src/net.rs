//! Network plumbing for the agent: TLS trusting only the configured CA, the
//! HTTPS client for downloads, and the WebSocket device channel connection.

use crate::config::Download;
use anyhow::Context;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use uplift_proto::channel::{CHANNEL_PATH, MAX_FRAME_BYTES};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub type Channel = WebSocketStream<TlsStream<TcpStream>>;

/// Root store holding only the server's CA: the agent trusts nothing else.
pub fn tls_config(ca_file: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca_file)
        .with_context(|| format!("reading server CA {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("parsing server CA {}", ca_file.display()))?;
        roots.add(cert).with_context(|| {
            format!(
                "server CA {} is not a usable certificate",
                ca_file.display()
            )
        })?;
    }
    if roots.is_empty() {
        anyhow::bail!("server CA {} holds no certificate", ca_file.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("building TLS configuration")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

pub fn http_client(ca_file: &Path, download: &Download) -> anyhow::Result<reqwest::Client> {
    download_client(ca_file, download)?
        // Redirects (direct downloads from an object store) are followed
        // by hand, with the other client, never with the session token.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building HTTPS client")
}

/// The client for presigned object-store URLs the server redirects chunk
/// downloads to: it trusts `direct_ca_file` (or the server's CA), speaks
/// plain HTTP only if `direct_allow_http`, and has no credential to send.
pub fn direct_client(server_ca: &Path, download: &Download) -> anyhow::Result<reqwest::Client> {
    let ca_file = download.direct_ca_file.as_deref().unwrap_or(server_ca);
    download_client(ca_file, download)?
        .https_only(!download.direct_allow_http)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building the object-store download client")
}

/// What both download clients share: roots from `ca_file` only, the
/// stall timeout and the receive windows.
fn download_client(ca_file: &Path, download: &Download) -> anyhow::Result<reqwest::ClientBuilder> {
    let stall_timeout = download.stall_timeout();
    let (stream_window, connection_window) = download.receive_windows();
    let pem = std::fs::read(ca_file)
        .with_context(|| format!("reading CA bundle {}", ca_file.display()))?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false);
    let mut roots = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("parsing {}", ca_file.display()))?;
        builder = builder.add_root_certificate(
            reqwest::Certificate::from_der(cert.as_ref())
                .with_context(|| format!("parsing {}", ca_file.display()))?,
        );
        roots += 1;
    }
    anyhow::ensure!(roots > 0, "{} holds no certificate", ca_file.display());
    Ok(builder
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(stall_timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        // HTTP/2 when the server offers it (ALPN): parallel span requests
        // share one connection. Fixed flow-control windows bound what the
        // server may send ahead of the writer: the slot (fsync-bound) is
        // slower than loopback or a LAN, and the adaptive window held
        // several MiB of receive buffers on a 1 GiB install (peak RSS 19.2
        // MiB; 16.8 with a 1 MiB window, and faster).
        .http2_initial_stream_window_size(stream_window)
        .http2_initial_connection_window_size(connection_window)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .http2_keep_alive_timeout(stall_timeout))
}

/// Opens the device channel: TCP, TLS (checking the server name), WebSocket.
pub async fn connect_channel(
    server_url: &reqwest::Url,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Channel> {
    connect_channel_with(server_url, tls, &ChannelOptions::default()).await
}

/// How a channel is opened beyond the server's URL and TLS: the agent uses
/// the defaults; the load generator (`uplift-loadgen`) binds many sessions
/// to many loopback source addresses and keeps its buffers small.
#[derive(Debug, Clone, Default)]
pub struct ChannelOptions {
    /// Local address to bind the socket to before connecting (port 0: any).
    pub bind: Option<IpAddr>,
    /// The WebSocket layer's settings; the frame and message limits are
    /// always [`MAX_FRAME_BYTES`].
    pub websocket: WebSocketConfig,
}

/// [`connect_channel`] with [`ChannelOptions`].
pub async fn connect_channel_with(
    server_url: &reqwest::Url,
    tls: Arc<rustls::ClientConfig>,
    options: &ChannelOptions,
) -> anyhow::Result<Channel> {
    let host = server_url.host_str().context("server_url has no host")?;
    let port = server_url
        .port_or_known_default()
        .context("server_url has no port")?;
    let host_for_tls = host.trim_start_matches('[').trim_end_matches(']');
    let server_name = ServerName::try_from(host_for_tls.to_owned())
        .context("server_url host is not a valid name")?;
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        connect_tcp(host_for_tls, port, options.bind),
    )
    .await
    .context("connecting timed out")?
    .with_context(|| format!("connecting to {host}:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let tls_stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp),
    )
    .await
    .context("TLS handshake timed out")?
    .context("TLS handshake failed (is server_ca the server's CA?)")?;
    let mut url = server_url.clone();
    url.set_scheme("wss")
        .map_err(|()| anyhow::anyhow!("cannot form a wss:// URL from {server_url}"))?;
    url.set_path(CHANNEL_PATH);
    let config = options
        .websocket
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let (ws, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::client_async_with_config(url.as_str(), tls_stream, Some(config)),
    )
    .await
    .context("WebSocket handshake timed out")?
    .context("WebSocket handshake failed")?;
    Ok(ws)
}

/// TCP to the server, from `bind` when given (the server's name is
/// resolved and its first address of `bind`'s family is used).
async fn connect_tcp(host: &str, port: u16, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(local) = bind else {
        return TcpStream::connect((host, port)).await;
    };
    let remote = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4() == local.is_ipv4())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                format!("{host} has no address of the family of {local}"),
            )
        })?;
    let socket = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // The port is chosen at connect, unique for the four-tuple only: a
    // port bound before connect is reserved for every destination, and a
    // generator's 100 000 sessions would take every ephemeral port from
    // the other processes on the host (a balancer's own connections to the
    // replicas fail with "no free ports").
    #[cfg(target_os = "linux")]
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(std::io::Error::from)?;
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(remote).await
}
