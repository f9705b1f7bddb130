//! A site cache, as an operator would set one up: devices at a site
//! download through nginx (`deploy/site-cache.nginx.conf`, run as shipped
//! with its names and paths replaced) in the site's own network namespace,
//! whose uplink to the server is rate-limited with tc; the server runs in a
//! namespace of its own. Each chunk must cross the uplink once, every
//! device must still be authorized by the server, and the fleet must take
//! about as long as one device, not N times as long.
//!
//! Needs root (network namespaces, tc) and nginx: skipped outside CI when
//! they are missing, a failure under CI (`CI` set).

use crate::common;

use common::netns::{self, run, End, Namespaces};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uplift_fleet::{write_image, Device};
use uplift_proto::channel::AgentState;

const DEVICES: usize = 8;
/// A private range inside the namespaces only; nothing in the root namespace.
const SERVER_ADDR: &str = "10.213.77.1";
const SITE_ADDR: &str = "10.213.77.2";
const CACHE_PORT: u16 = 8443;
/// The site's uplink: 40 Mbit/s (5 MB/s), server to site.
const UPLINK_MBIT: u64 = 40;
const IMAGE_BYTES: u64 = 16 << 20;
/// The server certificate's name as the cache checks it.
const SERVER_NAME: &str = "uplift-server.site-cache.test";

/// The server's and the site's network namespaces, joined by a veth pair
/// shaped on the server's side; removed (and this thread's own namespace
/// restored) on drop.
struct Network {
    server: String,
    site: String,
    _namespaces: Namespaces,
}

impl Network {
    fn build() -> anyhow::Result<Self> {
        anyhow::ensure!(
            Path::new("/usr/sbin/nginx").is_file(),
            "nginx is not installed (/usr/sbin/nginx)"
        );
        let id = std::process::id();
        let (server, site) = (format!("upc-srv-{id}"), format!("upc-site-{id}"));
        let namespaces = Namespaces::create(&[&server, &site])?;
        let up = "uplink";
        namespaces.veth(
            End {
                ns: &server,
                dev: up,
                addr: &format!("{SERVER_ADDR}/30"),
            },
            End {
                ns: &site,
                dev: "downlink",
                addr: &format!("{SITE_ADDR}/30"),
            },
        )?;
        // Downloads flow server -> site: shape the server's side.
        run(&[
            "ip",
            "netns",
            "exec",
            &server,
            "tc",
            "qdisc",
            "add",
            "dev",
            up,
            "root",
            "tbf",
            "rate",
            &format!("{UPLINK_MBIT}mbit"),
            "burst",
            "64kb",
            "latency",
            "200ms",
        ])?;
        Ok(Self {
            server,
            site,
            _namespaces: namespaces,
        })
    }
}

/// nginx as the site cache, from the deploy example.
struct Cache {
    child: Child,
    dir: PathBuf,
}

impl Cache {
    fn start(dir: &Path, site: &str, server_port: u16, server_ca: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        // nginx makes a cache's own directory, not its parents.
        std::fs::create_dir_all(dir.join("cache"))?;
        let (cert, key) = site_certificate(dir)?;
        let example = include_str!("../../../../deploy/site-cache.nginx.conf");
        let path = |p: &Path| p.display().to_string();
        let mut conf = example.to_owned();
        for (from, to) in [
            (
                "/var/cache/uplift/",
                format!("{}/", path(&dir.join("cache"))),
            ),
            (
                "uplift.example.net:8443",
                format!("{SERVER_ADDR}:{server_port}"),
            ),
            (
                "proxy_ssl_name uplift.example.net",
                format!("proxy_ssl_name {SERVER_NAME}"),
            ),
            ("listen 8443", format!("listen {SITE_ADDR}:{CACHE_PORT}")),
            ("/etc/nginx/uplift-site-cache.pem", path(&cert)),
            ("/etc/nginx/uplift-site-cache.key", path(&key)),
            ("/etc/nginx/uplift-server-ca.pem", path(server_ca)),
        ] {
            anyhow::ensure!(
                conf.contains(from),
                "deploy/site-cache.nginx.conf no longer holds {from:?}; update this test with it"
            );
            conf = conf.replace(from, &to);
        }
        let tmp = path(&dir.join("tmp"));
        let main = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root;\n\
             error_log {dir}/error.log info;\npid {dir}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               log_format upstream '$uri $args $upstream_cache_status $status $upstream_addr';\n\
               access_log {dir}/access.log upstream;\n\
               log_subrequest on;\n\
               client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n\
               uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
               include {dir}/site-cache.conf;\n\
             }}\n",
            dir = path(dir),
        );
        std::fs::write(dir.join("site-cache.conf"), conf)?;
        std::fs::write(dir.join("nginx.conf"), main)?;
        let log = std::fs::File::create(dir.join("stderr"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", site, "/usr/sbin/nginx", "-c"])
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut cache = Self {
            child,
            dir: dir.to_owned(),
        };
        // Its address is reachable from the server's namespace, over the link.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect((SITE_ADDR, CACHE_PORT)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline && cache.child.try_wait()?.is_none(),
                "nginx did not start listening: {}{}",
                std::fs::read_to_string(dir.join("stderr")).unwrap_or_default(),
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(cache)
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `(uri, cache status)` of every request the cache answered, and of
    /// every authorize subrequest it made.
    fn log(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut words = l.split(' ');
                let (path, args) = (words.next()?, words.next()?);
                let uri = match args {
                    "-" => path.to_owned(),
                    args => format!("{path}?{args}"),
                };
                Some((uri, words.next()?.to_owned()))
            })
            .collect()
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (a SIGKILLed master would
        // leave them behind); SIGKILL if it has not gone in 5 s.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA of the site's own and the cache's certificate from it (for its
/// address), as PEM files in `dir`; agents trust the CA (`[download] ca`).
fn site_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "site cache test CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec![SITE_ADDR.to_owned()])?
        .signed_by(&key, &ca_cert, &ca_key)?;
    let (cert_path, key_path) = (dir.join("cache.pem"), dir.join("cache.key"));
    std::fs::write(&cert_path, leaf.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    Ok((cert_path, key_path))
}

/// Distinct chunk files of a release directory, plus its index if it has
/// one: what one device fetches of it when it holds none of its chunks.
fn objects_of(release: &Path) -> u64 {
    let chunks = std::fs::read_dir(release.join("chunks")).unwrap().count() as u64;
    chunks + u64::from(release.join("chunks.idx").is_file())
}

#[test]
fn devices_behind_a_site_cache_fetch_each_chunk_over_the_uplink_once() {
    let Some(network) = netns::or_skip(
        Network::build(),
        "site cache",
        "root, iproute2, tc and nginx",
    ) else {
        return;
    };
    netns::block_on_inside(&network.server, site_cache(&network));
}

async fn site_cache(network: &Network) {
    let (fx, _) = Fixture::start_at(SERVER_ADDR, &[SERVER_NAME], "", IMAGE_BYTES).await;
    let server_port: u16 = fx
        .server
        .listen_addr()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let cache = Cache::start(
        &fx.path("cache"),
        &network.site,
        server_port,
        &fx.server.endpoint.ca_file,
    )
    .expect("nginx starts as the site cache");
    let image_v1_2 = fx.path("images/os-1.2.img");
    write_image(&image_v1_2, IMAGE_BYTES, 3).unwrap();

    // One device alone, then a fleet of DEVICES, all at the site.
    let cache_url = format!("https://{SITE_ADDR}:{CACHE_PORT}");
    let mut devices: Vec<Device> = (0..=DEVICES)
        .map(|i| {
            let mut spec = fx.spec(&format!("hw-site-{i}"));
            spec.extra_config = format!(
                "[download]\nurl = {}\nca = {}\n",
                toml::Value::String(cache_url.clone()),
                toml::Value::String(cache.ca().display().to_string())
            );
            fx.device_in(&format!("d{i}"), spec, &network.site)
        })
        .collect();
    let all: Vec<&Device> = devices.iter().collect();
    fx.wait_for("every device enrolled on 1.0", &all, |views| {
        views.len() == DEVICES + 1
            && views
                .iter()
                .all(|d| d.online && d.state == Some(AgentState::Idle))
    })
    .await;
    let release_1_1 = fx
        .release("1.1", DEVICE_TYPE, &fx.image_v1_1, &fx.key)
        .await;
    let release_1_2 = fx.release("1.2", DEVICE_TYPE, &image_v1_2, &fx.key).await;

    let solo = &devices[0];
    let solo_id = id_of(solo);
    let before = fx.client.stats().await.unwrap();
    let started = Instant::now();
    fx.rollout("1.1", Some(vec![solo_id.clone()])).await;
    fx.wait_for_within(
        "the lone device on 1.1",
        Duration::from_secs(180),
        &[solo],
        |views| {
            views.iter().any(|d| {
                d.id == solo_id
                    && d.running_version == Some(v("1.1"))
                    && d.state == Some(AgentState::Idle)
            })
        },
    )
    .await;
    let one_device = started.elapsed();
    let after_solo = fx.client.stats().await.unwrap();

    let fleet: Vec<&Device> = devices[1..].iter().collect();
    let fleet_ids: Vec<_> = fleet.iter().map(|d| id_of(d)).collect();
    let started = Instant::now();
    fx.rollout("1.2", Some(fleet_ids.clone())).await;
    let views = fx
        .wait_for_within(
            "every device of the fleet on 1.2",
            Duration::from_secs(300),
            &fleet,
            |views| {
                views.iter().filter(|d| fleet_ids.contains(&d.id)).all(|d| {
                    d.running_version == Some(v("1.2")) && d.state == Some(AgentState::Idle)
                })
            },
        )
        .await;
    let fleet_time = started.elapsed();
    let after_fleet = fx.client.stats().await.unwrap();
    assert!(views.iter().all(|d| d.last_error.is_none()), "{views:#?}");

    // What crossed the uplink, counted by the server.
    let solo_objects = after_solo.chunks_sent - before.chunks_sent;
    let fleet_objects = after_fleet.chunks_sent - after_solo.chunks_sent;
    let fleet_bytes = after_fleet.bytes_sent - after_solo.bytes_sent;
    let solo_bytes = after_solo.bytes_sent - before.bytes_sent;
    let ratio = fleet_time.as_secs_f64() / one_device.as_secs_f64();
    let uplink = UPLINK_MBIT * 1_000_000 / 8;
    eprintln!(
        "site cache: 1 device {:.1} s ({solo_objects} objects, {:.1} MB over the uplink); \
         {DEVICES} devices {:.1} s ({fleet_objects} objects, {:.1} MB over the uplink); \
         fleet/one = {ratio:.2} (without a cache the uplink alone needs {:.1} s for {DEVICES})",
        one_device.as_secs_f64(),
        solo_bytes as f64 / 1e6,
        fleet_time.as_secs_f64(),
        fleet_bytes as f64 / 1e6,
        (DEVICES as u64 * fleet_bytes) as f64 / uplink as f64,
    );
    assert_eq!(
        solo_objects,
        objects_of(&release_1_1),
        "the lone device fetched each object of 1.1 once, through the cache"
    );
    assert_eq!(
        fleet_objects,
        objects_of(&release_1_2),
        "each object of 1.2 crossed the uplink once for {DEVICES} devices"
    );
    // The cache's own account: every body fetched upstream once (MISS),
    // the other devices' requests answered from it (HIT).
    let log = cache.log();
    let spans: Vec<&(String, String)> = log
        .iter()
        .filter(|(uri, _)| uri.starts_with("/v1/device/releases/1.2/"))
        .collect();
    let mut misses = std::collections::HashMap::<&str, usize>::new();
    for (uri, status) in &spans {
        if status != "HIT" {
            *misses.entry(uri.as_str()).or_default() += 1;
        }
    }
    assert!(
        misses.values().all(|&n| n == 1),
        "a body fetched upstream more than once: {misses:?}"
    );
    let hits = spans.iter().filter(|(_, s)| s == "HIT").count();
    let asked: Vec<&String> = log
        .iter()
        .filter(|(uri, _)| uri == "/_uplift_authorize")
        .map(|(_, status)| status)
        .collect();
    let kept = asked.iter().filter(|s| s.as_str() == "HIT").count();
    eprintln!(
        "site cache: {} device requests authorized, {kept} of them by an answer the cache kept",
        asked.len()
    );
    assert_eq!(
        asked.len(),
        log.len() - asked.len(),
        "every device request, hit or miss, was authorized first"
    );
    assert!(
        asked.len() - kept <= 2 * (DEVICES + 1),
        "the server's 204 is kept per token: about one question per device, not one per request"
    );
    assert_eq!(
        hits,
        (DEVICES - 1) * misses.len(),
        "every other device was served from the cache: {spans:?}"
    );
    assert!(
        ratio < DEVICES as f64 / 2.0,
        "{DEVICES} devices took {ratio:.2} times as long as one: the cache does not share the uplink"
    );

    // Authorization through the cache: a cached body is still refused to
    // a request without a valid token; the server says why, in its kind.
    let (cached_uri, _) = spans[0];
    let through_cache = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(cache.ca()).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    for token in [
        None,
        Some("ut1.key-0.dev-0000000000000000.99999999999.AAAA"),
        Some("junk"),
    ] {
        let mut request = through_cache.get(format!("{cache_url}{cached_uri}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "a cached body, token {token:?}");
        // The server's reason, passed on by the cache.
        let said: uplift_proto::WireError = response.json().await.unwrap();
        let kind = match token {
            None => uplift_proto::ErrorKind::Unauthorized,
            Some(_) => uplift_proto::ErrorKind::DownloadTokenInvalid,
        };
        assert_eq!(said.kind, kind, "{said}");
    }
    let direct = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&fx.server.endpoint.ca_file).unwrap())
                .unwrap(),
        )
        .build()
        .unwrap();
    let refused = direct
        .get(format!("{}{cached_uri}", fx.server.endpoint.url))
        .bearer_auth("ut1.key-0.dev-0000000000000000.99999999999.AAAA")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let said: uplift_proto::WireError = refused.json().await.unwrap();
    assert_eq!(
        said.kind,
        uplift_proto::ErrorKind::DownloadTokenInvalid,
        "{said}"
    );

    let stopped = tokio::task::spawn_blocking(move || {
        uplift_fleet::stop_all(&mut devices, Duration::from_secs(10))
    });
    let _ = stopped.await;
    drop(cache);
    fx.server.stop_async().await;
}
