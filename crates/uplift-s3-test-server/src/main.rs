//! A real S3-compatible server for Uplift's object-storage tests: `s3s-fs`
//! (the `s3s` crate's file-system backend) behind hyper, on a loopback
//! address, speaking S3 over plain HTTP with SigV4 authentication (headers
//! and presigned URLs alike). It is a separate process so tests can stop it
//! mid-rollout (SIGKILL) and start it again on the same port and directory.
//!
//! It prints `listening on http://ADDR` on stdout once it accepts
//! connections; with `--listen 127.0.0.1:0` that line tells the test its port.

use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
struct Opt {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Access key id requests must be signed with.
    #[arg(long)]
    access_key: String,
    /// Secret access key requests must be signed with.
    #[arg(long)]
    secret_key: String,
    /// Buckets to create (as directories under the root) before serving.
    #[arg(long)]
    bucket: Vec<String>,
    /// Directory holding the buckets and their objects.
    root: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opt = Opt::parse();
    anyhow::ensure!(
        opt.listen.ip().is_loopback(),
        "the test S3 server serves loopback addresses only, not {}",
        opt.listen
    );
    for bucket in &opt.bucket {
        // s3s-fs keeps a bucket as a directory of the root.
        std::fs::create_dir_all(opt.root.join(bucket))?;
    }
    let fs = s3s_fs::FileSystem::new(&opt.root)
        .map_err(|e| anyhow::anyhow!("opening {}: {e:?}", opt.root.display()))?;
    let service = {
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(opt.access_key, opt.secret_key));
        builder.build()
    };
    let listener = tokio::net::TcpListener::bind(opt.listen).await?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
