//! `uplift-boot-sim`: plays firmware and bootloader for one simulated
//! device. See the crate documentation of `uplift_sim`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Parser;
use uplift_sim::{install_stop_handler, run, SimConfig};

/// Boot simulator for one Uplift device: on every power-on it runs the A/B
/// trial-boot rules over the GRUB environment file, writes the kernel
/// command line for the chosen slot and starts the agent. An agent exit
/// with code 194 is a reboot; any other exit ends the simulator with the
/// same code.
#[derive(Debug, Parser)]
#[command(name = "uplift-boot-sim", version)]
struct Args {
    /// GRUB environment file of the device (provisioned beforehand).
    #[arg(long, value_name = "PATH")]
    bootenv: PathBuf,

    /// File to write the simulated kernel command line to
    /// (`uplift.slot=a|b`); the agent reads it like /proc/cmdline.
    #[arg(long, value_name = "PATH")]
    cmdline: PathBuf,

    /// Give up after this many boots: an endless reboot loop is a bug.
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_boots: u32,

    /// Slot A image; with --slot-b, lets the simulated kernel refuse an
    /// image marked unbootable (see `uplift_sim::KERNEL_PANIC_MARKER`).
    #[arg(long, value_name = "PATH", requires = "slot_b")]
    slot_a: Option<PathBuf>,

    /// Slot B image.
    #[arg(long, value_name = "PATH", requires = "slot_a")]
    slot_b: Option<PathBuf>,

    /// Hardware watchdog, in seconds: a trial boot whose slot is not
    /// committed within this time is reset (the agent's process group
    /// SIGKILLed, the device powered on again), and so is a kernel that
    /// hangs on a trial boot. Off by default.
    #[arg(long, value_name = "SECS")]
    watchdog_secs: Option<f64>,

    /// The agent command, after `--`.
    #[arg(
        last = true,
        required = true,
        value_name = "AGENT_PROGRAM [AGENT_ARGS]"
    )]
    agent: Vec<OsString>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match try_main(args) {
        Ok(code) => code,
        Err(e) => {
            // Our error messages already include their causes; `{:#}` would
            // repeat them.
            eprintln!("boot-sim: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn try_main(args: Args) -> anyhow::Result<ExitCode> {
    let stop = install_stop_handler()
        .map_err(|e| anyhow!("cannot install the SIGTERM/SIGINT handler: {e}"))?;
    let mut agent = args.agent.into_iter();
    let config = SimConfig {
        bootenv: args.bootenv,
        cmdline: args.cmdline,
        max_boots: args.max_boots,
        program: agent.next().context("no agent command given after `--`")?,
        args: agent.collect(),
        slots: args.slot_a.zip(args.slot_b).map(|(a, b)| [a, b]),
        watchdog: args
            .watchdog_secs
            .map(|secs| {
                std::time::Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .with_context(|| {
                        format!("--watchdog-secs {secs}: give a positive number of seconds")
                    })
            })
            .transpose()?,
    };
    let outcome = run(&config, stop)?;
    // Exit codes are 0..=255 on Unix and 128+signal stays below 256.
    Ok(ExitCode::from(
        u8::try_from(outcome.exit_code()).unwrap_or(1),
    ))
}
