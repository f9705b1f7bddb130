//! `uplift-server`: parses arguments and runs [`uplift_server::Server`].

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use uplift_server::config::ServerConfig;

#[derive(Debug, Parser)]
#[command(name = "uplift-server", version, about = "Uplift fleet upgrade server")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Data directory (database, chunks, TLS material, tokens); overrides the config.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8443 (port 0 picks a free one); overrides the config.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Serve the admin API only on this address (e.g. 127.0.0.1:8444); overrides the config.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// PostgreSQL database (postgres://user:password@host:port/database)
    /// instead of SQLite in the data directory; overrides [database] url.
    #[arg(
        long,
        env = "UPLIFT_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Write the endpoint (URL, CA file, token files) as JSON here once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Check every chunk of every stored release against its hash (read-only;
    /// safe beside a running server). Exits 1 if any is missing or damaged,
    /// 2 if the check could not run.
    Check,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "uplift_server=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let mut config = match (&args.config, &args.data_dir) {
        (Some(path), _) => ServerConfig::load(path)?,
        (None, Some(dir)) => ServerConfig::with_data_dir(dir.clone()),
        (None, None) => anyhow::bail!("give --config FILE or --data-dir DIR"),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(admin) = args.admin_listen {
        config.admin_listen = Some(admin);
    }
    if let Some(url) = args.database_url {
        config.database.url = Some(url);
        config
            .check()
            .map_err(|e| anyhow::anyhow!("--database-url: {e}"))?;
    }
    if let Some(Command::Check) = args.command {
        // 1 means damage found; 2, that nothing could be checked.
        match uplift_server::check_data_dir(&config).await {
            Ok(report) => {
                print!("{}", report.render());
                std::process::exit(if report.is_clean() { 0 } else { 1 });
            }
            Err(e) => {
                eprintln!("uplift-server check: {e:#}");
                std::process::exit(2);
            }
        }
    }
    let server = uplift_server::Server::open(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another server running there?",
                config.listen
            )
        })?;
    let admin_listener = match config.admin_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen for the admin API on {addr}; is another server running there?")
        })?),
        None => None,
    };
    let endpoint = server.endpoint(&listener, admin_listener.as_ref())?;
    println!("uplift-server listening on {}", endpoint.url);
    if let Some(url) = &endpoint.admin_url {
        println!("  admin API on {url} only");
    }
    println!(
        "  CA certificate: {} (SHA-256 {})",
        endpoint.ca_file.display(),
        endpoint.ca_fingerprint
    );
    if let Some(path) = &endpoint.admin_token_file {
        println!("  admin token:      {}", path.display());
    }
    if let Some(path) = &endpoint.enrollment_token_file {
        println!("  enrollment token: {}", path.display());
    }
    if let Some(path) = &args.ready_file {
        uplift_files::replace_file(
            path,
            &serde_json::to_vec_pretty(&endpoint)?,
            uplift_files::Access::Public,
        )
        .with_context(|| format!("writing ready file {}", path.display()))?;
    }
    server
        .run_split(listener, admin_listener, shutdown_signal())
        .await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
