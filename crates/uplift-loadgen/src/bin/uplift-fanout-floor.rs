//! `uplift-fanout-floor`: the baseline for the offer latencies of
//! `bench/replicas` (see `uplift_loadgen::floor`): `identity` makes a TLS
//! identity, `serve` holds connections and pushes a frame to each on
//! SIGUSR1, `connect` holds sessions and notes when their frames arrive.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use uplift_loadgen::floor::{self, ConnectPlan};

#[derive(Debug, Parser)]
#[command(
    name = "uplift-fanout-floor",
    about = "Pushes a frame to every held TLS WebSocket connection: the fan-out floor"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes ca.pem, server.pem and server.key to DIR.
    Identity { dir: PathBuf },
    /// Holds connections; each SIGUSR1 sends every one a frame. Prints
    /// "listening on ADDR" once listening; ends on SIGTERM.
    Serve {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// The directory `identity` wrote.
        #[arg(long)]
        tls_dir: PathBuf,
        /// The frame's size: an offer's (128 bytes of JSON in the bench).
        #[arg(long, default_value_t = 128)]
        frame_bytes: usize,
    },
    /// Opens the sessions, writes FILE once all are up, and writes the
    /// frames' arrival times (JSON) to stdout once each has had one; then
    /// holds the sessions until --hold-until-file exists.
    Connect {
        #[arg(long)]
        server: reqwest::Url,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        sessions: usize,
        /// This client's number among the run's (0, 1, ...): its sessions'
        /// share of the source addresses.
        #[arg(long, default_value_t = 0)]
        index: usize,
        /// Answer each frame with one this long (a device's `downloading`
        /// report is 139 bytes of JSON); 0 answers nothing.
        #[arg(long, default_value_t = 0)]
        answer_bytes: usize,
        #[arg(long)]
        connected_file: PathBuf,
        /// Keep the sessions up, once the arrivals are written, until FILE
        /// exists (at most --duration seconds from the start): the other
        /// clients' frames are still on their way.
        #[arg(long)]
        hold_until_file: Option<PathBuf>,
        #[arg(long, default_value_t = 600)]
        duration: u64,
    },
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("uplift-fanout-floor: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    uplift_loadgen::raise_open_files();
    match args.command {
        Command::Identity { dir } => floor::make_identity(&dir),
        Command::Serve {
            listen,
            tls_dir,
            frame_bytes,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            println!("listening on {}", listener.local_addr()?);
            let (push, pushes) = tokio::sync::watch::channel(0u64);
            let mut usr1 = signal(SignalKind::user_defined1())?;
            tokio::spawn(async move {
                while usr1.recv().await.is_some() {
                    push.send_modify(|n| *n += 1);
                }
            });
            let mut term = signal(SignalKind::terminate())?;
            floor::serve(listener, &tls_dir, frame_bytes, pushes, async move {
                term.recv().await;
            })
            .await
        }
        Command::Connect {
            server,
            ca,
            sessions,
            index,
            answer_bytes,
            connected_file,
            hold_until_file,
            duration,
        } => {
            let until = tokio::time::Instant::now() + Duration::from_secs(duration);
            let plan = ConnectPlan {
                server,
                ca,
                sessions,
                index,
                answer_bytes,
                duration: Duration::from_secs(duration),
            };
            let received = floor::connect(&plan, |up| {
                std::fs::write(&connected_file, up.to_string())
                    .with_context(|| format!("writing {}", connected_file.display()))
            })
            .await?;
            println!("{}", serde_json::to_string(&received)?);
            if let Some(file) = hold_until_file {
                uplift_loadgen::wait_until(until, || file.exists()).await;
            }
            Ok(())
        }
    }
}
