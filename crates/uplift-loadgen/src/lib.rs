//! The load generator's parts that more than one binary uses: the
//! measurements (`uplift-loadgen`) and the fan-out floor
//! (`uplift-fanout-floor`), the baseline its offer latencies compare to.

pub mod floor;
pub mod measure;

/// A process holding 19 000 sessions needs as many descriptors: the soft
/// limit goes up to the hard one (which nothing here raises).
pub fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// The `k`th loopback source address of a generator's range
/// `127.<range>.0.0/16`. The last octet stays within 1..=250, so no address
/// ends in 0 or 255, and each address gives a session its own ports.
pub fn loopback_source(range: u8, k: usize) -> std::net::IpAddr {
    let (hi, lo) = ((k / 250) % 256, k % 250 + 1);
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, range, hi as u8, lo as u8))
}

/// Polls `done` every 20 ms until it holds (true) or the deadline (false).
pub async fn wait_until(deadline: tokio::time::Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_walk_250_per_octet_and_never_end_in_0_or_255() {
        assert_eq!(loopback_source(1, 0).to_string(), "127.1.0.1");
        assert_eq!(loopback_source(1, 249).to_string(), "127.1.0.250");
        assert_eq!(loopback_source(6, 250).to_string(), "127.6.1.1");
        let distinct: std::collections::HashSet<_> =
            (0..64_000).map(|k| loopback_source(6, k)).collect();
        assert_eq!(distinct.len(), 64_000);
    }
}
