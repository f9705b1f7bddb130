//! Which of a rollout's devices fall in which phase: decided once, when the
//! rollout starts, from the device IDs and the rollout's seed alone, so it
//! is stable (stored, shown) and reproducible (the same inputs give the
//! same phases on any replica).

use sha2::{Digest, Sha256};
use uplift_proto::policy::PhaseReach;
use uplift_proto::{DeviceId, Version};

/// Each device with its phase, in phase order. Phase `phases.len()` is the
/// final one, for the devices the listed phases leave. A phase may be
/// empty when its reach adds nobody (1 % and 2 % of 20 devices are both
/// one device); the scheduler passes an empty phase at once.
///
/// The order within the target is by a hash of the seed and the device ID,
/// not by enrollment: a canary of 1 % is then a spread of the fleet, not
/// its oldest devices, and another rollout (another seed) picks others.
pub fn assign(devices: &[DeviceId], phases: &[PhaseReach], seed: &str) -> Vec<(DeviceId, u32)> {
    let mut ordered: Vec<([u8; 32], &DeviceId)> =
        devices.iter().map(|d| (rank(seed, d), d)).collect();
    ordered.sort_unstable_by(|a, b| (a.0, a.1.as_str()).cmp(&(b.0, b.1.as_str())));
    ordered.dedup_by(|a, b| a.1 == b.1);
    let total = ordered.len() as u64;
    let mut cuts: Vec<u64> = Vec::with_capacity(phases.len());
    let mut reached = 0;
    for phase in phases {
        reached = reached.max(phase.devices_of(total));
        cuts.push(reached);
    }
    ordered
        .into_iter()
        .enumerate()
        .map(|(position, (_, device))| {
            let phase = cuts.partition_point(|&cut| cut <= position as u64);
            (device.clone(), phase as u32)
        })
        .collect()
}

/// How many of `assigned` (as [`assign`] made them) fall in each phase, in
/// order, the final phase last: `listed_phases + 1` sizes. They depend on
/// how many devices there are and on the phases, never on the seed.
pub fn sizes(assigned: &[(DeviceId, u32)], listed_phases: usize) -> Vec<u64> {
    let mut sizes = vec![0; listed_phases + 1];
    for (_, phase) in assigned {
        sizes[*phase as usize] += 1;
    }
    sizes
}

/// The seed of a rollout's phases: its release and the moment it was
/// created, as its view shows them (`release`, `created_at`), so anyone
/// with the view and the rollout's devices can tell who is in which phase.
pub fn seed(release: &Version, created_at: &str) -> String {
    format!("{release}@{created_at}")
}

fn rank(seed: &str, device: &DeviceId) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(seed.as_bytes());
    hash.update([0]);
    hash.update(device.as_str().as_bytes());
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn fleet(n: usize) -> Vec<DeviceId> {
        (0..n)
            .map(|i| format!("dev-{i:05}").parse().unwrap())
            .collect()
    }

    fn sizes(assigned: &[(DeviceId, u32)], phases: usize) -> Vec<usize> {
        (0..=phases as u32)
            .map(|p| assigned.iter().filter(|(_, q)| *q == p).count())
            .collect()
    }

    #[test]
    fn cumulative_percentages_cut_the_target_and_the_rest_is_the_final_phase() {
        let phases = [
            PhaseReach::Percent(1),
            PhaseReach::Percent(10),
            PhaseReach::Percent(50),
        ];
        let assigned = assign(&fleet(1000), &phases, "rollout-7");
        assert_eq!(sizes(&assigned, 3), vec![10, 90, 400, 500]);
        let counted = [
            PhaseReach::Count(NonZeroU32::new(3).unwrap()),
            PhaseReach::Percent(50),
        ];
        assert_eq!(sizes(&assign(&fleet(10), &counted, "s"), 2), vec![3, 2, 5]);
        // What a rollout preview shows: the same, whatever the seed.
        for seed in ["s", "another", "1.1@2026-01-01T00:00:00Z"] {
            assert_eq!(
                super::sizes(&assign(&fleet(10), &counted, seed), 2),
                vec![3, 2, 5]
            );
        }
    }

    #[test]
    fn the_same_inputs_give_the_same_phases_in_any_input_order() {
        let phases = [PhaseReach::Percent(5), PhaseReach::Percent(30)];
        let devices = fleet(200);
        let mut reversed = devices.clone();
        reversed.reverse();
        let mut a = assign(&devices, &phases, "rollout-1");
        let mut b = assign(&reversed, &phases, "rollout-1");
        a.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        b.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        assert_eq!(a, b);
    }

    #[test]
    fn another_seed_picks_another_canary_spread_over_the_fleet() {
        let phases = [PhaseReach::Percent(5)];
        let canary = |seed| -> Vec<DeviceId> {
            assign(&fleet(400), &phases, seed)
                .into_iter()
                .filter(|(_, p)| *p == 0)
                .map(|(d, _)| d)
                .collect()
        };
        let (one, two) = (canary("rollout-1"), canary("rollout-2"));
        assert_eq!(one.len(), 20);
        assert_ne!(one, two);
        // Not the first-enrolled devices: some come from the back half.
        assert!(one.iter().any(|d| d.as_str() >= "dev-00200"));
    }

    #[test]
    fn a_small_target_leaves_phases_empty_rather_than_overfilling_them() {
        let phases = [
            PhaseReach::Percent(1),
            PhaseReach::Percent(2),
            PhaseReach::Percent(50),
        ];
        assert_eq!(sizes(&assign(&fleet(3), &phases, "s"), 3), vec![1, 0, 1, 1]);
        assert_eq!(sizes(&assign(&[], &phases, "s"), 3), vec![0, 0, 0, 0]);
        let dup = vec![fleet(1)[0].clone(), fleet(1)[0].clone()];
        assert_eq!(
            assign(&dup, &[], "s").len(),
            1,
            "a device listed twice is in once"
        );
    }
}
