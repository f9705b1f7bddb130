//! `uplift-agent`: runs the device agent with a TOML config.

use clap::Parser;
use std::path::PathBuf;
use uplift_agent::run::Exit;

#[derive(Debug, Parser)]
#[command(name = "uplift-agent", version, about = "Uplift device agent")]
struct Args {
    /// Agent configuration file.
    #[arg(long, short, default_value = "/etc/uplift/agent.toml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Print what this device knows about its slots, boot environment and
    /// installs, from its own files (no network).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Reboot the device if the booted slot is still on trial
    /// `trial_deadline_secs` after this starts (run early at boot by its own
    /// unit, so it works even when the agent itself does not).
    TrialGuard,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "uplift_agent=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Some(Command::Status { json }) = args.command {
        return match uplift_agent::config::AgentConfig::load(&args.config)
            .and_then(|c| uplift_agent::status::gather(&c))
        {
            Ok(status) if json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("status serializes")
                );
                std::process::ExitCode::SUCCESS
            }
            Ok(status) => {
                print!("{}", status.render());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("uplift-agent: error: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("uplift-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let guard = matches!(args.command, Some(Command::TrialGuard));
    let result = runtime.block_on(async {
        let config = uplift_agent::config::AgentConfig::load(&args.config)?;
        if guard {
            tokio::select! {
                exit = uplift_agent::guard::run(&config) => exit,
                () = shutdown_signal() => Ok(Exit::Stopped),
            }
        } else {
            uplift_agent::run::run(config, shutdown_signal()).await
        }
    });
    match result {
        Ok(Exit::Stopped) => std::process::ExitCode::SUCCESS,
        Ok(Exit::RebootRequested) => {
            std::process::ExitCode::from(uplift_bootenv::REBOOT_REQUEST_EXIT_CODE as u8)
        }
        Err(e) => {
            eprintln!("uplift-agent: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
