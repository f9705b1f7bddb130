//! Each device's private address (the patent: the server assigns each
//! client a different private-network address, over which they
//! communicate), on real network namespaces: the server in one, two devices
//! in one each, every device joined to the server's namespace by a veth
//! pair of its own (its link to the server; nothing else).
//!
//! The server assigns each device an address of `10.77.0.0/16` and of
//! `fd77::/64` at enrollment; the agent's `[network] address_hook` (the
//! README's example, a few `ip` lines) puts them on the device's end of its
//! link. The server side routes each device's private addresses to that
//! device's link, made from what the admin API says each device's
//! addresses are, as an operator's hub configuration would be (a WireGuard
//! peer's AllowedIPs). Then, from the server's namespace, each device
//! answers a TCP connection at its private IPv4 address and at its private
//! IPv6 address (a listener inside its namespace says which device it is);
//! from inside device A's namespace, device B answers at none of its
//! private addresses nor its link address, while the server side answers
//! A at both of its own.
//!
//! What the isolation rests on, honestly: the server side does not forward
//! between devices' links (`net.ipv4.ip_forward` and
//! `net.ipv6.conf.all.forwarding` are 0, as in any new namespace and on a
//! hub that only terminates its devices' tunnels), it answers IPv6
//! neighbour solicitations only for its own address, and each device has
//! no path but its own link. The test checks the forwarding settings
//! rather than assuming them. The address is stable: a restart of the agent
//! keeps it and does not run the hook again; a restart of the server keeps
//! it too. Needs root and iproute2: skipped outside CI when missing, a
//! failure under CI (`CI` set).

use crate::common;

use common::netns::{self, run, End, Namespaces};
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;
use uplift_fleet::{Device, ServerLaunch, ServerProcess};
use uplift_proto::channel::AgentState;

/// The server's own address in its namespace (on `lo`), where devices
/// connect over their links.
const SERVER_ADDR: &str = "10.213.79.1";
const LISTEN_PORT: u16 = 7070;

/// One device's namespace and its link to the server's.
struct Link {
    ns: String,
    /// The link's end in the server's namespace, and in the device's.
    server_end: String,
    device_end: String,
    /// The link's own (transport) addresses, a /30 each.
    server_addr: String,
    device_addr: String,
}

struct Network {
    server: String,
    links: Vec<Link>,
    _namespaces: Namespaces,
}

impl Network {
    fn build() -> anyhow::Result<Self> {
        let id = std::process::id();
        let server = format!("upa-srv-{id}");
        let links: Vec<Link> = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, name)| Link {
                ns: format!("upa-{name}-{id}"),
                server_end: format!("to-{name}"),
                device_end: "uplink".into(),
                server_addr: format!("10.213.{}.1", 80 + i),
                device_addr: format!("10.213.{}.2", 80 + i),
            })
            .collect();
        let names: Vec<&str> = std::iter::once(server.as_str())
            .chain(links.iter().map(|l| l.ns.as_str()))
            .collect();
        let namespaces = Namespaces::create(&names)?;
        let srv = server.as_str();
        run(&[
            "ip",
            "-n",
            srv,
            "addr",
            "add",
            &format!("{SERVER_ADDR}/32"),
            "dev",
            "lo",
        ])?;
        for l in &links {
            namespaces.veth(
                End {
                    ns: srv,
                    dev: &l.server_end,
                    addr: &format!("{}/30", l.server_addr),
                },
                End {
                    ns: &l.ns,
                    dev: &l.device_end,
                    addr: &format!("{}/30", l.device_addr),
                },
            )?;
            // The device's only way out is its link to the server.
            run(&[
                "ip",
                "-n",
                &l.ns,
                "route",
                "add",
                "default",
                "via",
                &l.server_addr,
            ])?;
        }
        Ok(Self {
            server,
            links,
            _namespaces: namespaces,
        })
    }
}

/// A TCP listener inside `ns` on every address, answering each connection
/// with `name`: "the device answers at its private address".
fn answer_in(ns: &str, name: &'static str) {
    let ns = ns.to_owned();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        netns::enter(&ns).expect("entering the device's namespace");
        // One dual-stack socket: IPv4 and IPv6 (a new namespace's
        // `net.ipv6.bindv6only` is 0).
        let listener = TcpListener::bind(("::", LISTEN_PORT)).expect("listener");
        ready_tx.send(()).unwrap();
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(name.as_bytes());
        }
    });
    ready_rx.recv().unwrap();
}

/// What answers at `addr` (port [`LISTEN_PORT`]), tried from namespace
/// `from` (the caller's own if `None`), within a second.
fn who_answers(from: Option<&str>, addr: &str) -> Result<String, String> {
    let from = from.map(str::to_owned);
    let ip: std::net::IpAddr = addr.parse().unwrap();
    let target = SocketAddr::new(ip, LISTEN_PORT);
    std::thread::spawn(move || {
        if let Some(ns) = &from {
            netns::enter(ns).map_err(|e| e.to_string())?;
        }
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(1))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        let mut said = String::new();
        stream
            .read_to_string(&mut said)
            .map_err(|e| e.to_string())?;
        Ok(said)
    })
    .join()
    .unwrap()
}

/// The address hook as the README shows it, for a device whose link to
/// the server is `dev`: the addresses on the link, the log line for the
/// test to count runs.
fn hook(path: &Path, dev: &str, log: &Path) {
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\n\
             set -e\n\
             [ -n \"$UPLIFT_ADDRESS_V4\" ] && ip addr replace \"$UPLIFT_ADDRESS_V4\" dev {dev}\n\
             [ -n \"$UPLIFT_ADDRESS_V6\" ] && ip -6 addr replace \"$UPLIFT_ADDRESS_V6\" dev {dev} nodad\n\
             echo \"$UPLIFT_DEVICE_ID $UPLIFT_ADDRESSES\" >> {log}\n",
            log = log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn each_device_answers_at_its_private_address_and_not_to_another_device() {
    let Some(network) = netns::or_skip(Network::build(), "private address", "root and iproute2")
    else {
        return;
    };
    netns::block_on_inside(&network.server, private_addresses(&network));
}

async fn private_addresses(network: &Network) {
    let (mut fx, launch) = Fixture::start_at(
        SERVER_ADDR,
        &[],
        "[addresses]\npool = [\"10.77.0.0/16\", \"fd77::/64\"]\n",
        1 << 20,
    )
    .await;
    let server_dir = fx.server.dir.clone();

    let mut devices: Vec<Device> = Vec::new();
    for (i, link) in network.links.iter().enumerate() {
        let hook_path = fx.path(&format!("hook-{i}.sh"));
        let hook_log = fx.path(&format!("hook-{i}.log"));
        hook(&hook_path, &link.device_end, &hook_log);
        let mut spec = fx.spec(&format!("hw-private-{i}"));
        spec.extra_config = format!(
            "[network]\naddress_hook = {}\n",
            toml::Value::String(hook_path.display().to_string())
        );
        devices.push(fx.device_in(&format!("d{i}"), spec, &link.ns));
    }
    let all: Vec<&Device> = devices.iter().collect();
    let views = fx
        .wait_for("both devices enrolled", &all, |views| {
            views.len() == 2
                && views
                    .iter()
                    .all(|d| d.online && d.state == Some(AgentState::Idle))
        })
        .await;
    let id_of_dev = |d: &Device| d.device_id().unwrap();
    let addresses: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            let id = id_of_dev(d);
            views
                .iter()
                .find(|v| v.id.as_str() == id)
                .unwrap()
                .private_addresses
                .clone()
        })
        .collect();
    eprintln!("private addresses: {addresses:?}");
    for list in &addresses {
        assert_eq!(list.len(), 2, "one of each pool: {list:?}");
        assert!(
            list[0].starts_with("10.77.") && list[0].ends_with("/16"),
            "{list:?}"
        );
        assert!(
            list[1].starts_with("fd77::") && list[1].ends_with("/64"),
            "{list:?}"
        );
    }
    assert_ne!(addresses[0], addresses[1], "each device its own");
    let host = |cidr: &String| cidr.split('/').next().unwrap().to_owned();
    let ipv4: Vec<String> = addresses.iter().map(|list| host(&list[0])).collect();
    let ipv6: Vec<String> = addresses.iter().map(|list| host(&list[1])).collect();

    // The hook ran in each device's namespace: the addresses are on its
    // link. (The agent applies them beside the channel: wait a moment.)
    for (i, link) in network.links.iter().enumerate() {
        let mut shown = String::new();
        for _ in 0..50 {
            shown = run(&[
                "ip",
                "-n",
                &link.ns,
                "addr",
                "show",
                "dev",
                &link.device_end,
            ])
            .unwrap();
            if addresses[i].iter().all(|a| shown.contains(a.as_str())) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for a in &addresses[i] {
            assert!(shown.contains(a.as_str()), "{a} on {}: {shown}", link.ns);
        }
    }

    // The server side: its own private addresses (each pool's first
    // host), and each device's addresses routed to that device's link,
    // from the API's view (what an operator's hub configuration is made
    // from). IPv6 finds neighbours only on the link an address is on: the
    // server side's IPv6 address is on each device's link (the device's
    // /64 makes it on-link there).
    let srv = network.server.as_str();
    let (server_v4, server_v6) = ("10.77.0.1", "fd77::1");
    run(&["ip", "-n", srv, "addr", "add", "10.77.0.1/32", "dev", "lo"]).unwrap();
    for (i, link) in network.links.iter().enumerate() {
        let end = link.server_end.as_str();
        run(&[
            "ip",
            "-n",
            srv,
            "-6",
            "addr",
            "add",
            "fd77::1/128",
            "dev",
            end,
            "nodad",
        ])
        .unwrap();
        run(&[
            "ip",
            "-n",
            srv,
            "route",
            "add",
            &format!("{}/32", ipv4[i]),
            "dev",
            end,
            "src",
            server_v4,
        ])
        .unwrap();
        run(&[
            "ip",
            "-n",
            srv,
            "-6",
            "route",
            "add",
            &format!("{}/128", ipv6[i]),
            "dev",
            end,
            "src",
            server_v6,
        ])
        .unwrap();
    }
    for forwarding in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
        assert_eq!(
            run(&["ip", "netns", "exec", srv, "sysctl", "-n", forwarding])
                .unwrap()
                .trim(),
            "0",
            "the server side does not forward between devices' links ({forwarding})"
        );
    }

    answer_in(&network.links[0].ns, "device a");
    answer_in(&network.links[1].ns, "device b");
    // From the server's namespace (this thread's), each at its private
    // addresses, IPv4 and IPv6.
    for (i, name) in ["device a", "device b"].into_iter().enumerate() {
        for private in [&ipv4[i], &ipv6[i]] {
            assert_eq!(
                who_answers(None, private).as_deref(),
                Ok(name),
                "{name} at {private}"
            );
        }
    }
    // From inside device A's namespace: the server, yes (its private
    // addresses); device B, at none of its private addresses nor its link
    // address.
    let a_ns = Some(network.links[0].ns.as_str());
    let b_link = &network.links[1].device_addr;
    for b_address in [&ipv4[1], &ipv6[1], b_link] {
        assert!(
            who_answers(a_ns, b_address).is_err(),
            "device A reached device B at {b_address}"
        );
    }
    // Device A does reach the server side's private addresses: its link
    // works, so the refusals above are isolation, not a broken network.
    answer_in(srv, "server");
    for server in [server_v4, server_v6] {
        assert_eq!(
            who_answers(a_ns, server).as_deref(),
            Ok("server"),
            "the server side at {server}"
        );
    }

    // Stable: an agent restart keeps the address and does not run the
    // hook again; a server restart keeps it too.
    let logs: Vec<_> = (0..2).map(|i| fx.path(&format!("hook-{i}.log"))).collect();
    let runs = |i: usize| {
        std::fs::read_to_string(&logs[i])
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!((runs(0), runs(1)), (1, 1), "each hook ran once");
    devices[0].stop();
    devices[0].start(&fx.bins).unwrap();
    // On the same port: the agents' configs name it.
    let launch = ServerLaunch {
        listen: fx.server.listen_addr().to_string(),
        ..launch
    };
    fx.server.stop();
    fx.server = ServerProcess::launch_async(&fx.bins, &server_dir, launch)
        .await
        .expect("server restarts");
    fx.client = fx.server.client().unwrap();
    let all: Vec<&Device> = devices.iter().collect();
    let again = fx
        .wait_for("both devices back after the restarts", &all, |views| {
            views.len() == 2 && views.iter().all(|d| d.online)
        })
        .await;
    for (d, list) in devices.iter().zip(&addresses) {
        let view = again
            .iter()
            .find(|v| v.id.as_str() == id_of_dev(d))
            .unwrap();
        assert_eq!(&view.private_addresses, list, "stable across restarts");
    }
    assert_eq!((runs(0), runs(1)), (1, 1), "not re-run on a reconnect");
    let shown = uplift(&fx, &["devices", "show", &id_of_dev(&devices[0])]);
    assert!(shown.contains(&addresses[0][0]), "{shown}");

    // Removed, a device's addresses go back to the pool.
    let gone = id_of_dev(&devices[1]);
    uplift(&fx, &["devices", "remove", &gone]);
    let view = fx.client.device(&gone.parse().unwrap()).await.unwrap();
    assert!(view.private_addresses.is_empty(), "{view:?}");
    for mut d in devices {
        d.stop();
    }
}
