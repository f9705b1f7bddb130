//! The README's demo command, run as a user would run it.

use crate::common;

use common::run_bounded;
use std::process::Command;
use std::time::Duration;
use uplift_fleet::demo::whole_run_limit;

/// How long a test lets a demo with `--timeout seconds` run: the demo's own
/// bound on its whole run, plus a margin for stopping its processes.
fn limit_for(seconds: u64) -> Duration {
    whole_run_limit(Duration::from_secs(seconds)) + Duration::from_secs(60)
}

#[test]
fn uplift_demo_upgrades_every_device_and_reports_json() {
    let work = tempfile::tempdir().unwrap();
    let output = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_uplift"))
            .args([
                "demo",
                "--devices",
                "4",
                "--image-mib",
                "1",
                "--json",
                "--timeout",
                "90",
                "--workdir",
            ])
            .arg(work.path()),
        limit_for(90),
        work.path(),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(summary["devices"], 4);
    assert_eq!(summary["upgraded"], 4);
    assert_eq!(summary["failed"], 0);
    assert!(summary["seconds"].as_f64().unwrap() > 0.0);
    let sent = summary["bytes_sent"].as_u64().unwrap();
    assert!(
        sent > 0 && sent < 4 * 1024 * 1024 + 64 * 1024,
        "each device fetched at most one image: {sent}"
    );
    let peak = summary["server_peak_rss_bytes"].as_u64().unwrap_or(0);
    assert!(
        peak > 1024 * 1024 && peak < 4 * 1024 * 1024 * 1024,
        "the server's peak RSS, read from /proc: {summary}"
    );
    // The database counters are the server's to fill in; the summary must
    // carry them, and their rate must agree with them.
    let rows = summary["db_rows_written"]
        .as_u64()
        .expect("db_rows_written");
    assert!(summary["db_write_batches"].as_u64().is_some(), "{summary}");
    let rate = summary["db_rows_per_second"]
        .as_f64()
        .expect("db_rows_per_second");
    let seconds = summary["seconds"].as_f64().unwrap();
    assert!(
        (rate * seconds - rows as f64).abs() < 1.0,
        "{rate} rows/s over {seconds} s is not {rows} rows"
    );
    let envs = std::fs::read_dir(work.path().join("devices"))
        .unwrap()
        .count();
    assert_eq!(envs, 4, "one directory of slots per device");
    for entry in std::fs::read_dir(work.path().join("devices")).unwrap() {
        let env = std::fs::read_to_string(entry.unwrap().path().join("grubenv")).unwrap();
        assert!(env.contains("uplift_default=b\n"), "{env}");
    }
}

#[test]
fn uplift_demo_with_chaos_survives_every_kind_of_fault() {
    let work = tempfile::tempdir().unwrap();
    let output = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_uplift"))
            .args([
                "demo",
                "--devices",
                "6",
                "--image-mib",
                "2",
                "--chaos",
                "--json",
                "--timeout",
                "120",
                "--workdir",
            ])
            .arg(work.path()),
        limit_for(120),
        work.path(),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(
        (summary["upgraded"].as_u64(), summary["failed"].as_u64()),
        (Some(6), Some(0)),
        "{summary}"
    );
    assert!(
        summary["server_peak_rss_bytes"].as_u64().unwrap_or(0) > 1024 * 1024,
        "the peak over both server processes: {summary}"
    );
    let faults = &summary["faults"];
    assert_eq!(faults["server_restarts"], 1, "{summary}");
    assert!(
        faults["connection_cuts"].as_u64().unwrap() >= 1
            && faults["agent_kills"].as_u64().unwrap() >= 1,
        "{summary}"
    );
}

/// The soak: the chaos demo over many devices, bounded by its timeout. Not
/// part of the normal run; start it on demand with
/// `UPLIFT_SOAK_DEVICES=200 cargo test -p uplift-cli --test e2e demo_command:: -- --ignored`.
#[test]
#[ignore = "soak test, run on demand"]
fn soak_chaos_over_many_devices() {
    let devices: usize = std::env::var("UPLIFT_SOAK_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let work = tempfile::tempdir().unwrap();
    let output = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_uplift"))
            .args([
                "demo",
                "--chaos",
                "--json",
                "--image-mib",
                "4",
                "--timeout",
                "600",
                "--devices",
            ])
            .arg(devices.to_string())
            .arg("--workdir")
            .arg(work.path()),
        limit_for(600),
        work.path(),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "soak failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("{summary}");
    assert_eq!(
        summary["upgraded"].as_u64(),
        Some(devices as u64),
        "{summary}"
    );
}
