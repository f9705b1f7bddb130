//! The device's private-network addresses, as the server assigns them (one
//! per pool, in the channel's `welcome`), applied by the operator's
//! `[network] address_hook`: the agent does not know how the private
//! network is built (WireGuard, a VLAN, a veth), so a script does that.
//!
//! The hook runs when the addresses are new or changed, not on every
//! reconnect: what it last applied is remembered in the state directory
//! (`private-addresses.json`). A hook that fails or times out is logged as
//! an error and run again at the next connection; it never stops the
//! channel or an upgrade.

use crate::config::Network;
use crate::local::LocalState;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uplift_proto::DeviceId;

/// What the hook last applied successfully.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub device_id: DeviceId,
    /// CIDR forms, as the server sent them.
    pub addresses: Vec<String>,
}

/// The hook's environment for these addresses: each family's first address
/// (the server sends at most one of each), all of them, and the device.
pub fn hook_env(device_id: &DeviceId, addresses: &[String]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("UPLIFT_DEVICE_ID", device_id.to_string()),
        ("UPLIFT_ADDRESSES", addresses.join(" ")),
    ];
    if let Some(v4) = addresses.iter().find(|a| !a.contains(':')) {
        env.push(("UPLIFT_ADDRESS_V4", v4.clone()));
    }
    if let Some(v6) = addresses.iter().find(|a| a.contains(':')) {
        env.push(("UPLIFT_ADDRESS_V6", v6.clone()));
    }
    env
}

/// The pure decision: run the hook unless it applied exactly these already.
pub fn needs_applying(last: Option<&Applied>, now: &Applied) -> bool {
    last != Some(now)
}

/// What became of the addresses in one welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No addresses, and none were applied before: nothing to do.
    Nothing,
    /// The hook applied them already (an earlier connection).
    Unchanged,
    /// No hook is configured: logged only.
    NoHook,
    /// The hook ran and succeeded.
    Applied,
    /// The hook failed, or did not finish in time; the reason.
    Failed(String),
}

/// Applies the addresses of a welcome through the hook, if they changed.
pub async fn apply(
    network: &Network,
    local: &LocalState,
    device_id: &DeviceId,
    addresses: Vec<String>,
) -> Outcome {
    let now = Applied {
        device_id: device_id.clone(),
        addresses,
    };
    let last = match local.applied_addresses() {
        Ok(last) => last,
        Err(e) => {
            tracing::warn!("{e:#}; applying the private addresses again");
            None
        }
    };
    if now.addresses.is_empty() && last.is_none() {
        return Outcome::Nothing;
    }
    if !needs_applying(last.as_ref(), &now) {
        return Outcome::Unchanged;
    }
    let Some(hook) = &network.address_hook else {
        tracing::info!(
            addresses = %now.addresses.join(" "),
            "the server assigned private addresses; no [network] address_hook is configured to apply them"
        );
        return Outcome::NoHook;
    };
    let command = vec![hook.display().to_string()];
    let env = hook_env(device_id, &now.addresses);
    let limit = Duration::from_secs(network.address_hook_timeout_secs);
    match crate::health::run_command("address hook", &command, &env, limit).await {
        Ok(()) => {
            tracing::info!(addresses = %now.addresses.join(" "), "private addresses applied");
            if let Err(e) = local.save_applied_addresses(&now) {
                tracing::warn!("{e:#}; the address hook runs again at the next connection");
            }
            Outcome::Applied
        }
        Err(reason) => {
            tracing::error!(
                kind = "hook_failed",
                addresses = %now.addresses.join(" "),
                "applying the private addresses failed: {reason}; it is tried again at the next \
                 connection (upgrades go on regardless)"
            );
            Outcome::Failed(reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(addresses: &[&str]) -> Applied {
        Applied {
            device_id: "dev-1".parse().unwrap(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn the_hook_gets_each_family_and_runs_only_on_a_change() {
        let env = hook_env(
            &"dev-1".parse().unwrap(),
            &["10.77.0.5/16".into(), "fd77::5/64".into()],
        );
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("UPLIFT_ADDRESS_V4"), Some("10.77.0.5/16"));
        assert_eq!(get("UPLIFT_ADDRESS_V6"), Some("fd77::5/64"));
        assert_eq!(get("UPLIFT_ADDRESSES"), Some("10.77.0.5/16 fd77::5/64"));
        assert_eq!(get("UPLIFT_DEVICE_ID"), Some("dev-1"));
        let only_v6 = hook_env(&"dev-1".parse().unwrap(), &["fd77::5/64".into()]);
        assert!(only_v6.iter().all(|(k, _)| *k != "UPLIFT_ADDRESS_V4"));

        let a = applied(&["10.77.0.5/16"]);
        assert!(needs_applying(None, &a));
        assert!(!needs_applying(Some(&a), &a));
        assert!(needs_applying(Some(&a), &applied(&["10.77.0.6/16"])));
        assert!(needs_applying(Some(&a), &applied(&[])), "taken away");
    }

    #[tokio::test]
    async fn a_hook_runs_once_per_change_and_its_failure_is_not_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalState::open(&dir.path().join("state")).unwrap();
        let runs = dir.path().join("runs");
        let hook = dir.path().join("hook");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$UPLIFT_ADDRESS_V4\" >> {}\n[ ! -e {}/fail ]\n",
                runs.display(),
                dir.path().display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        let network = Network {
            address_hook: Some(hook),
            address_hook_timeout_secs: 5,
        };
        let id: DeviceId = "dev-1".parse().unwrap();
        let v4 = |a: &str| vec![a.to_owned()];
        assert_eq!(apply(&network, &local, &id, vec![]).await, Outcome::Nothing);
        assert_eq!(
            apply(&network, &local, &id, v4("10.77.0.5/16")).await,
            Outcome::Applied
        );
        assert_eq!(
            apply(&network, &local, &id, v4("10.77.0.5/16")).await,
            Outcome::Unchanged,
            "a reconnect does not run it again"
        );
        std::fs::write(dir.path().join("fail"), "").unwrap();
        assert!(matches!(
            apply(&network, &local, &id, v4("10.77.0.9/16")).await,
            Outcome::Failed(_)
        ));
        std::fs::remove_file(dir.path().join("fail")).unwrap();
        assert_eq!(
            apply(&network, &local, &id, v4("10.77.0.9/16")).await,
            Outcome::Applied,
            "a failed run is tried again"
        );
        let ran = std::fs::read_to_string(&runs).unwrap();
        assert_eq!(ran, "10.77.0.5/16\n10.77.0.9/16\n10.77.0.9/16\n");
    }
}
