//! Every systemd unit in `deploy/` passes `systemd-analyze verify` without
//! a single warning (it exits 0 on an unknown key or a value it cannot
//! parse, and only says so), and the agent's unit keeps what the agent's
//! sd_notify support relies on.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT_SUFFIXES: &[&str] = &["service", "socket", "timer", "target", "path", "mount"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn units() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("read deploy/")
        .map(|e| e.expect("deploy/ entry").path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| UNIT_SUFFIXES.contains(&e))
        })
        .collect();
    units.sort();
    units
}

/// The programs a unit starts (`ExecStart=` and the like), with the
/// prefixes systemd allows (`-`, `@`, `+`, `!`, `:`) taken off.
fn programs(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            key.trim().starts_with("Exec").then_some(value)
        })
        .filter_map(|value| {
            let program = value.split_whitespace().next()?;
            Some(
                program
                    .trim_start_matches(['-', '@', '+', '!', ':'])
                    .to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_unit_in_deploy_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("CI").is_some() {
            panic!("systemd-analyze is missing; CI installs systemd (.ci/run)");
        }
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let units = units();
    let names: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for wanted in [
        "uplift-agent.service",
        "uplift-server.service",
        "uplift-trial-guard.service",
    ] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
    }

    // A root of its own (--root): the units under test in
    // /etc/systemd/system, the host's stock units they name
    // (network-online.target, sysinit.target, ...), and an executable where
    // each program they start will be installed, since verify checks that
    // it exists. Nothing is installed on the host.
    let root = tempfile::tempdir().unwrap();
    let stock = Path::new("/usr/lib/systemd/system");
    std::fs::create_dir_all(root.path().join("usr/lib/systemd")).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(stock)
        .arg(root.path().join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(copied.success(), "copy {}", stock.display());
    let etc = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    let mut under_test = Vec::new();
    for (unit, name) in units.iter().zip(&names) {
        let text = std::fs::read_to_string(unit).unwrap();
        for program in programs(&text) {
            assert!(
                program.starts_with('/'),
                "{name}: {program} is not an absolute path"
            );
            let at = root.path().join(program.trim_start_matches('/'));
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::fs::write(&at, "#!/bin/sh\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = etc.join(name);
        std::fs::write(&path, text).unwrap();
        under_test.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .args(&under_test)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {names:?}: {}\n{said}",
        out.status
    );
}

#[test]
fn the_agent_unit_waits_for_readiness_and_keeps_a_watchdog() {
    let unit = std::fs::read_to_string(deploy_dir().join("uplift-agent.service")).unwrap();
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for wanted in ["Type=notify", "NotifyAccess=main", "Restart=always"] {
        assert!(
            settings.contains(&wanted),
            "{wanted} in uplift-agent.service"
        );
    }
    let watchdog = settings
        .iter()
        .find_map(|l| l.strip_prefix("WatchdogSec="))
        .expect("WatchdogSec= in uplift-agent.service");
    let secs: u64 = watchdog
        .trim_end_matches('s')
        .parse()
        .expect("WatchdogSec in seconds");
    // The agent's longest legitimate pause in its main loop is a
    // boot-environment write; far below this, but not by much on bad flash.
    assert!((30..=300).contains(&secs), "WatchdogSec={watchdog}");
}
