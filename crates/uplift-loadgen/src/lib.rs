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
