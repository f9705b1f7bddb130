//! Starting the test S3 server (this crate's binary) from a test: a child
//! process on a loopback port with its objects in a directory, stopped
//! (SIGKILL, as a crashed store) and started again on the same port and
//! directory.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The credentials the test server accepts.
pub const ACCESS_KEY: &str = "uplift-test-access";
pub const SECRET_KEY: &str = "uplift-test-secret-key";
pub const BUCKET: &str = "uplift-test";

/// A running test S3 server.
#[derive(Debug)]
pub struct S3Server {
    child: Option<Child>,
    bin: PathBuf,
    pub root: PathBuf,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl S3Server {
    /// Starts the server on a free port with bucket [`BUCKET`] under `root`.
    pub fn start(root: &Path) -> anyhow::Result<Self> {
        let bin = locate()?;
        let mut server = Self {
            child: None,
            bin,
            root: root.to_owned(),
            addr: "127.0.0.1:0".into(),
        };
        server.spawn()?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`, the endpoint to configure.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An `[artifacts]` table for `uplift-server` using this store.
    pub fn artifacts_toml(&self, direct_downloads: bool) -> String {
        format!(
            "[artifacts]\nbackend = \"s3\"\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\nallow_http = true\n\
             access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\nprefix = \"fleet\"\n\
             request_timeout_secs = 3\ndirect_downloads = {direct_downloads}\npresign_secs = 120\n",
            self.endpoint()
        )
    }

    /// Where an object of the bucket is on disk (s3s-fs keeps keys as paths).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        let mut child = Command::new(&self.bin)
            .args(["--listen", &self.addr])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .args(["--bucket", BUCKET])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", self.bin.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the test S3 server did not start: {line:?}");
        };
        self.addr = addr.to_owned();
        self.child = Some(child);
        Ok(())
    }

    /// Kills the server, as a store that crashed or became unreachable.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        // The port was just freed; another process may take it meanwhile,
        // but nothing else on a test machine binds ports this way.
        let mut last = None;
        for _ in 0..50 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(last.expect("tried at least once"))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The binary beside the running test (`target/<profile>/`), or in
/// `$UPLIFT_BIN_DIR`.
fn locate() -> anyhow::Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("UPLIFT_BIN_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    dirs.extend(exe.ancestors().skip(1).take(2).map(Path::to_owned));
    dirs.iter()
        .map(|dir| dir.join("uplift-s3-test-server"))
        .find(|bin| bin.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "uplift-s3-test-server is not built beside {} (run `cargo build --bins` first)",
                exe.display()
            )
        })
}
