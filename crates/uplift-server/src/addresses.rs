//! Each device's private-network address: the server assigns every device
//! one address from each configured pool (`[addresses] pool`, at most one
//! IPv4 and one IPv6 CIDR), different from every other device's, over which
//! server and device then communicate once the agent's `address_hook` has
//! set it up (a WireGuard peer, a VLAN, a veth: the deployment's choice).
//!
//! An address is stored, so it is stable across reconnects and restarts,
//! and unique by the store's UNIQUE constraint, not by this process's
//! memory: two replicas that pick the same address for two devices at once
//! see one insert fail, and the loser picks again. Picks are random within
//! the pool (no read of every taken address per enrollment, which at a
//! hundred thousand devices would be the cost of each one), and only after
//! many collisions (a nearly full pool) does the server look for the lowest
//! free address, which also tells an exhausted pool apart. A removed
//! device's addresses go back to the pool.
//!
//! Of each pool the network address (and for IPv4 the broadcast address)
//! is never given out, and neither is the first host address: it is the
//! server side's own address on the private network (the gateway, or the
//! WireGuard hub), for the operator to configure there.

use crate::state::AppState;
use crate::store::AddressClaim;
use ipnet::IpNet;
use std::collections::HashSet;
use std::net::IpAddr;
use uplift_proto::DeviceId;

/// Random picks before the server looks for the lowest free address.
const RANDOM_PICKS: u32 = 16;

/// One pool, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    net: IpNet,
}

/// The configured pools, IPv4 first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pools(Vec<Pool>);

/// A pool that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("[addresses] pool {text:?} is not a CIDR such as 10.77.0.0/16 or fd77::/64: {detail}")]
    NotCidr { text: String, detail: String },
    #[error("[addresses] pool {text:?} has host bits set; write its network, {network}")]
    HostBits { text: String, network: IpNet },
    #[error(
        "[addresses] pool {net} is too small: a pool needs room for the network address, the \
         server's own address and at least one device (IPv4 at most /30, IPv6 at most /126)"
    )]
    TooSmall { net: IpNet },
    #[error(
        "[addresses] pool lists two {family} pools ({first} and {second}); a device gets one \
         address per family, so give at most one IPv4 and one IPv6 pool"
    )]
    SameFamily {
        family: &'static str,
        first: IpNet,
        second: IpNet,
    },
}

impl Pool {
    fn parse(text: &str) -> Result<Self, PoolError> {
        let net: IpNet =
            text.trim()
                .parse()
                .map_err(|e: ipnet::AddrParseError| PoolError::NotCidr {
                    text: text.to_owned(),
                    detail: e.to_string(),
                })?;
        if net.trunc() != net {
            return Err(PoolError::HostBits {
                text: text.to_owned(),
                network: net.trunc(),
            });
        }
        let pool = Pool { net };
        if pool.capacity() == 0 {
            return Err(PoolError::TooSmall { net });
        }
        Ok(pool)
    }

    /// The pool as stored and shown: its network in CIDR form.
    pub fn name(&self) -> String {
        self.net.to_string()
    }

    pub fn is_ipv4(&self) -> bool {
        matches!(self.net, IpNet::V4(_))
    }

    fn host_bits(&self) -> u32 {
        u32::from(self.net.max_prefix_len() - self.net.prefix_len())
    }

    /// Addresses a device may get: all but the network address, the
    /// server's own (the first host) and IPv4's broadcast address. Capped
    /// at `u64::MAX` (an IPv6 /64 has more than anyone enrolls).
    pub fn capacity(&self) -> u64 {
        let reserved = if self.is_ipv4() { 3 } else { 2 };
        let size = 1u128.checked_shl(self.host_bits()).unwrap_or(u128::MAX);
        u64::try_from(size.saturating_sub(reserved)).unwrap_or(u64::MAX)
    }

    /// The `n`th address a device may get (`n` below [`Pool::capacity`]).
    pub fn nth(&self, n: u64) -> IpAddr {
        let offset = u128::from(n) + 2;
        match self.net {
            IpNet::V4(net) => {
                IpAddr::V4((u32::from(net.network()) + u32::try_from(offset).unwrap_or(0)).into())
            }
            IpNet::V6(net) => IpAddr::V6((u128::from(net.network()) + offset).into()),
        }
    }

    /// An address in CIDR form with the pool's prefix, as devices get it.
    pub fn cidr(&self, address: IpAddr) -> String {
        format!("{address}/{}", self.net.prefix_len())
    }

    /// Whether `cidr` (as [`Pool::cidr`] writes it) is an address of this
    /// pool that a device may have.
    fn holds(&self, cidr: &str) -> bool {
        cidr.parse::<IpNet>().is_ok_and(|a| {
            a.prefix_len() == self.net.prefix_len()
                && self.net.contains(&a.addr())
                && a.addr() != self.net.network()
                && a.addr() != self.gateway()
                && (!self.is_ipv4() || a.addr() != self.net.broadcast())
        })
    }

    /// The server side's own address in the pool: its first host address.
    pub fn gateway(&self) -> IpAddr {
        match self.net {
            IpNet::V4(net) => IpAddr::V4((u32::from(net.network()) + 1).into()),
            IpNet::V6(net) => IpAddr::V6((u128::from(net.network()) + 1).into()),
        }
    }
}

impl Pools {
    /// The pools of `[addresses] pool`, checked: each a network in CIDR
    /// form with room for devices, at most one per family.
    pub fn parse(texts: &[String]) -> Result<Self, PoolError> {
        let mut pools: Vec<Pool> = texts
            .iter()
            .map(|t| Pool::parse(t))
            .collect::<Result<_, _>>()?;
        pools.sort_by_key(|p| !p.is_ipv4());
        for pair in pools.windows(2) {
            if pair[0].is_ipv4() == pair[1].is_ipv4() {
                return Err(PoolError::SameFamily {
                    family: if pair[0].is_ipv4() { "IPv4" } else { "IPv6" },
                    first: pair[0].net,
                    second: pair[1].net,
                });
            }
        }
        Ok(Pools(pools))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Pool> {
        self.0.iter()
    }
}

/// What a device's stored addresses come to against the configured pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Its addresses to keep, by pool, in pool order.
    pub keep: Vec<(&'a Pool, String)>,
    /// Pools it has no address of yet.
    pub assign: Vec<&'a Pool>,
    /// Whether it holds addresses of pools no longer configured (or that
    /// no longer fit one): they are released.
    pub release_stale: bool,
}

/// The pure decision: which of `held` (CIDR forms) stay, and which pools
/// still owe the device an address.
pub fn plan<'a>(pools: &'a Pools, held: &[String]) -> Plan<'a> {
    let mut keep = Vec::new();
    let mut assign = Vec::new();
    for pool in pools.iter() {
        match held.iter().find(|cidr| pool.holds(cidr)) {
            Some(cidr) => keep.push((pool, cidr.clone())),
            None => assign.push(pool),
        }
    }
    let release_stale = held.len() > keep.len();
    Plan {
        keep,
        assign,
        release_stale,
    }
}

/// The lowest address of `pool` not in `taken`: among the first
/// `taken.len() + 1` candidates one is free, or the pool is full.
pub fn lowest_free(pool: &Pool, taken: &HashSet<IpAddr>) -> Option<IpAddr> {
    let span = (taken.len() as u64 + 1).min(pool.capacity());
    (0..span).map(|n| pool.nth(n)).find(|a| !taken.contains(a))
}

/// Why a device has no address of a pool.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    #[error(
        "pool {pool} is full: every one of its {capacity} device addresses is taken; \
         widen it in [addresses] pool, or remove devices no longer in use"
    )]
    Exhausted { pool: String, capacity: u64 },
    #[error("assigning device {device} an address of pool {pool}: {source}")]
    Store {
        device: DeviceId,
        pool: String,
        #[source]
        source: crate::store::StoreError,
    },
}

/// The device's addresses (CIDR forms, IPv4 first), assigning those it
/// lacks and releasing those of pools no longer configured; `held` is what
/// its record says. A pool that cannot give it one is logged and skipped:
/// the address is for the device's private network, and the channel and
/// upgrades do not depend on it.
pub async fn ensure(state: &AppState, device: &DeviceId, held: &[String]) -> Vec<String> {
    let pools = &state.addresses;
    let plan = plan(pools, held);
    if plan.release_stale {
        let keep: Vec<String> = pools.iter().map(Pool::name).collect();
        if let Err(e) = state.store.release_addresses(device, &keep).await {
            tracing::warn!(device = %device, "releasing addresses of pools no longer configured: {e}");
        }
    }
    let mut addresses: Vec<(bool, String)> = plan
        .keep
        .iter()
        .map(|(pool, cidr)| (pool.is_ipv4(), cidr.clone()))
        .collect();
    for pool in plan.assign {
        match assign(state, device, pool).await {
            Ok(Some(cidr)) => {
                tracing::info!(device = %device, address = %cidr, "private address assigned");
                addresses.push((pool.is_ipv4(), cidr));
            }
            // The device was removed meanwhile: nothing to give it.
            Ok(None) => {}
            Err(e) => tracing::error!(device = %device, "{e}"),
        }
    }
    addresses.sort_by_key(|(v4, _)| !v4);
    addresses.into_iter().map(|(_, cidr)| cidr).collect()
}

/// Claims an address of `pool` for `device`: random picks, then the lowest
/// free one; `None` if the device is gone (removed).
async fn assign(
    state: &AppState,
    device: &DeviceId,
    pool: &Pool,
) -> Result<Option<String>, AssignError> {
    let store_error = |source| AssignError::Store {
        device: device.clone(),
        pool: pool.name(),
        source,
    };
    let claim = |address: IpAddr| {
        let cidr = pool.cidr(address);
        async move {
            let claimed = state
                .store
                .claim_address(device, &pool.name(), &address.to_string(), &cidr)
                .await;
            claimed.map(|c| (c, cidr))
        }
    };
    for _ in 0..RANDOM_PICKS {
        let n = rand::random::<u64>() % pool.capacity();
        match claim(pool.nth(n)).await.map_err(store_error)? {
            (AddressClaim::Claimed, cidr) => return Ok(Some(cidr)),
            (AddressClaim::Held(cidr), _) => return Ok(Some(cidr)),
            (AddressClaim::NoDevice, _) => return Ok(None),
            (AddressClaim::Taken, _) => continue,
        }
    }
    // Nearly full: the lowest free address, as long as others take them.
    loop {
        let taken: HashSet<IpAddr> = state
            .store
            .pool_addresses(&pool.name())
            .await
            .map_err(store_error)?
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let Some(free) = lowest_free(pool, &taken) else {
            return Err(AssignError::Exhausted {
                pool: pool.name(),
                capacity: pool.capacity(),
            });
        };
        match claim(free).await.map_err(store_error)? {
            (AddressClaim::Claimed, cidr) => return Ok(Some(cidr)),
            (AddressClaim::Held(cidr), _) => return Ok(Some(cidr)),
            (AddressClaim::NoDevice, _) => return Ok(None),
            (AddressClaim::Taken, _) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(list: &[&str]) -> Result<Pools, PoolError> {
        Pools::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn pools_are_checked_with_errors_that_say_what_to_write() {
        let p = pools(&["fd77::/64", "10.77.0.0/16"]).unwrap();
        let names: Vec<String> = p.iter().map(Pool::name).collect();
        assert_eq!(names, ["10.77.0.0/16", "fd77::/64"], "IPv4 first");
        let err = pools(&["10.77.0.5/16"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "[addresses] pool \"10.77.0.5/16\" has host bits set; write its network, 10.77.0.0/16"
        );
        assert!(matches!(
            pools(&["10.77.0.0"]),
            Err(PoolError::NotCidr { .. })
        ));
        assert!(matches!(
            pools(&["banana/8"]),
            Err(PoolError::NotCidr { .. })
        ));
        assert!(matches!(
            pools(&["10.0.0.0/31"]),
            Err(PoolError::TooSmall { .. })
        ));
        assert!(matches!(
            pools(&["fd00::/127"]),
            Err(PoolError::TooSmall { .. })
        ));
        assert!(pools(&["10.0.0.0/30"]).is_ok());
        let err = pools(&["10.1.0.0/16", "10.2.0.0/16"]).unwrap_err();
        assert!(err.to_string().contains("at most one IPv4"), "{err}");
        assert!(pools(&[]).unwrap().is_empty());
    }

    #[test]
    fn devices_get_neither_the_network_nor_the_servers_nor_the_broadcast_address() {
        let p = pools(&["10.0.0.0/29", "fd00::/126"]).unwrap();
        let v4 = &p.0[0];
        assert_eq!(v4.capacity(), 5);
        let all: Vec<String> = (0..v4.capacity()).map(|n| v4.nth(n).to_string()).collect();
        assert_eq!(
            all,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        assert_eq!(v4.gateway().to_string(), "10.0.0.1");
        assert_eq!(v4.cidr(v4.nth(0)), "10.0.0.2/29");
        let v6 = &p.0[1];
        assert_eq!(v6.capacity(), 2);
        assert_eq!(v6.nth(1).to_string(), "fd00::3");
        let big = pools(&["fd77::/64", "10.77.0.0/16"]).unwrap();
        assert_eq!(big.0[0].capacity(), 65_533);
        assert_eq!(big.0[1].capacity(), u64::MAX - 1, "2^64 less two");
        assert_eq!(
            big.0[1].nth(u64::MAX - 2).to_string(),
            "fd77::ffff:ffff:ffff:ffff"
        );
    }

    #[test]
    fn a_device_keeps_what_fits_a_pool_and_is_owed_the_rest() {
        let p = pools(&["10.77.0.0/16", "fd77::/64"]).unwrap();
        let held = vec!["10.77.3.4/16".to_owned(), "10.9.0.2/16".to_owned()];
        let plan = plan(&p, &held);
        assert_eq!(plan.keep.len(), 1);
        assert_eq!(plan.keep[0].1, "10.77.3.4/16");
        assert_eq!(plan.assign.len(), 1);
        assert!(!plan.assign[0].is_ipv4());
        assert!(plan.release_stale, "10.9.0.2 is of no pool now");
        // The same network with another prefix is another pool.
        let plan2 = plan_of(&p, &["10.77.3.4/24"]);
        assert_eq!(plan2, (0, 2, true));
        // The server's own address is never a device's.
        assert_eq!(plan_of(&p, &["10.77.0.1/16"]), (0, 2, true));
        assert_eq!(plan_of(&p, &["10.77.0.2/16", "fd77::2/64"]), (2, 0, false));
    }

    fn plan_of(p: &Pools, held: &[&str]) -> (usize, usize, bool) {
        let held: Vec<String> = held.iter().map(|s| s.to_string()).collect();
        let plan = plan(p, &held);
        (plan.keep.len(), plan.assign.len(), plan.release_stale)
    }

    #[test]
    fn the_lowest_free_address_is_found_among_as_many_as_are_taken() {
        let p = pools(&["10.0.0.0/29"]).unwrap();
        let pool = &p.0[0];
        let mut taken = HashSet::new();
        for n in [0, 1, 3] {
            taken.insert(pool.nth(n));
        }
        assert_eq!(lowest_free(pool, &taken), Some(pool.nth(2)));
        for n in 0..pool.capacity() {
            taken.insert(pool.nth(n));
        }
        assert_eq!(lowest_free(pool, &taken), None, "full");
    }
}
