//! Network namespaces for the tests that need a network of their own (the
//! site cache, the private addresses): made with `ip netns`, joined by veth
//! pairs, the test's threads moved into one of them so nothing it starts
//! binds outside loopback at home, and all of it deleted when the test ends.
//!
//! Needs root and iproute2. A test that cannot build its network is
//! skipped outside CI and fails under CI (`CI` set): see [`or_skip`].

use std::future::Future;
use std::os::fd::AsFd as _;
use std::process::{Command, Stdio};

/// Runs a command to completion; its standard output, or what failed.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.join(" ")))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A test's network namespaces: each made afresh with its loopback up;
/// deleted on drop, after the dropping thread is moved back to the
/// namespace it was made in.
pub struct Namespaces {
    names: Vec<String>,
    home: std::fs::File,
}

/// One end of a veth pair: its namespace, its name there, and its address
/// with prefix length (`10.0.0.1/30`).
pub struct End<'a> {
    pub ns: &'a str,
    pub dev: &'a str,
    pub addr: &'a str,
}

impl Namespaces {
    /// Makes the namespaces named (a stale one of the same name, left by a
    /// killed run, is deleted first).
    pub fn create(names: &[&str]) -> anyhow::Result<Self> {
        let home = std::fs::File::open("/proc/thread-self/ns/net")?;
        let mut made = Self {
            names: Vec::new(),
            home,
        };
        for ns in names {
            let _ = run(&["ip", "netns", "del", ns]);
            run(&["ip", "netns", "add", ns])?;
            made.names.push((*ns).to_owned());
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(made)
    }

    /// Joins two namespaces with a veth pair, each end addressed and up.
    pub fn veth(&self, a: End<'_>, b: End<'_>) -> anyhow::Result<()> {
        run(&[
            "ip", "link", "add", a.dev, "netns", a.ns, "type", "veth", "peer", "name", b.dev,
            "netns", b.ns,
        ])?;
        for end in [a, b] {
            run(&["ip", "-n", end.ns, "addr", "add", end.addr, "dev", end.dev])?;
            run(&["ip", "-n", end.ns, "link", "set", end.dev, "up"])?;
        }
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = nix::sched::setns(self.home.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
        for ns in &self.names {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// Moves this thread (and every thread and process it starts from now on)
/// into namespace `ns`.
pub fn enter(ns: &str) -> anyhow::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// A network the test built, or `None` to skip it: outside CI a machine
/// without root or the tools named in `needs` skips the test (saying so);
/// under CI (`CI` set) that is a failure.
pub fn or_skip<T>(built: anyhow::Result<T>, test: &str, needs: &str) -> Option<T> {
    match built {
        Ok(network) => Some(network),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but the network of the {test} test cannot be built: {e:#}")
        }
        Err(e) => {
            eprintln!("skipping the {test} test (needs {needs}): {e:#}");
            None
        }
    }
}

/// Runs `test` inside namespace `ns`: this thread moves there first, then
/// the runtime is built, so its threads and whatever they start (servers,
/// agents, clients) are there too.
pub fn block_on_inside<F: Future>(ns: &str, test: F) -> F::Output {
    enter(ns).unwrap_or_else(|e| panic!("entering namespace {ns}: {e:#}"));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test)
}
