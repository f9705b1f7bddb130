//! A real PostgreSQL server for tests: its own cluster in a temporary
//! directory, listening on 127.0.0.1 at a free port, stopped (its whole
//! process group) and removed on drop. Used by the store conformance suite
//! and by integration tests that run servers on PostgreSQL.
//!
//! It runs Debian's binaries (`/usr/lib/postgresql/<version>/bin`, the
//! `postgresql` package; `PG_BIN` overrides the directory). PostgreSQL
//! refuses to run as root, so as root the cluster belongs to, and runs as,
//! the `postgres` user. Without the binaries [`TestPostgres::start`] says
//! why and returns `None` so that the test can skip, except under CI (`CI`
//! set), where a missing PostgreSQL is a failure: `.ci/run` installs it.

use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A running PostgreSQL cluster; trust authentication for user `postgres`.
#[derive(Debug)]
pub struct TestPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// `None` until it is started.
    server: Option<Child>,
    as_postgres: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TestPostgresError {
    #[error("{what} failed: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed ({status}): {output}")]
    Command {
        what: String,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error(
        "PostgreSQL on port {port} did not accept connections within {seconds} s; its log:\n{log}"
    )]
    NotReady {
        port: u16,
        seconds: u64,
        log: String,
    },
}

/// Where Debian's PostgreSQL binaries are: the newest version installed.
fn binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl TestPostgres {
    /// Starts a new cluster, or `None` (after saying why on stderr) when
    /// PostgreSQL is not installed and `CI` is not set. Panics when it is
    /// missing under CI, or installed but does not start.
    pub fn start() -> Option<Self> {
        let Some(bin) = binaries() else {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "CI is set but PostgreSQL is missing (no /usr/lib/postgresql/*/bin/initdb): \
                     .ci/run installs the postgresql package"
                );
            }
            eprintln!(
                "SKIPPED: PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; \
                 apt-get install postgresql, or set PG_BIN)"
            );
            return None;
        };
        match Self::start_with(&bin) {
            Ok(pg) => Some(pg),
            Err(e) => panic!("starting a test PostgreSQL from {}: {e}", bin.display()),
        }
    }

    fn start_with(bin: &Path) -> Result<Self, TestPostgresError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "uplift-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|source| TestPostgresError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        // Whoever owns it from here on, the cluster is removed on drop.
        let mut pg = TestPostgres {
            dir,
            bin: bin.to_owned(),
            port: 0,
            server: None,
            as_postgres,
        };
        if as_postgres {
            pg.run("chown", Command::new("chown").arg("postgres:").arg(&pg.dir))?;
        }
        let data = pg.dir.join("data");
        let mut initdb = pg.command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .args(["--no-instructions", "--locale=C"]);
        pg.run("initdb", &mut initdb)?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|source| TestPostgresError::Io {
                what: "finding a free port".into(),
                source,
            })?
            .port();
        pg.port = port;
        let log = pg.dir.join("postgres.log");
        let log_file = std::fs::File::create(&log).map_err(|source| TestPostgresError::Io {
            what: format!("creating {}", log.display()),
            source,
        })?;
        let mut server = pg.command("postgres");
        // Durability is not what a test is about: no fsync, and a few
        // hundred connections for several servers' pools at once.
        server
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(&pg.dir)
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .map_err(|source| TestPostgresError::Io {
                        what: "opening the log".into(),
                        source,
                    })?,
            )
            .stderr(log_file)
            // Its own process group, so that drop stops runuser, postgres
            // and every backend together.
            .process_group(0);
        pg.server = Some(server.spawn().map_err(|source| TestPostgresError::Io {
            what: "starting postgres".into(),
            source,
        })?);
        let started = Instant::now();
        let wait = Duration::from_secs(30);
        loop {
            let ready = pg
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(pg);
            }
            let exited = pg.server.as_mut().map(|s| s.try_wait());
            if started.elapsed() > wait || matches!(exited, Some(Ok(Some(_)))) {
                return Err(TestPostgresError::NotReady {
                    port,
                    seconds: wait.as_secs(),
                    log: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A command for one of PostgreSQL's binaries, as the cluster's owner.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, what: &str, command: &mut Command) -> Result<(), TestPostgresError> {
        let output = command.output().map_err(|source| TestPostgresError::Io {
            what: what.into(),
            source,
        })?;
        if output.status.success() {
            Ok(())
        } else {
            Err(TestPostgresError::Command {
                what: what.into(),
                status: output.status,
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            })
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Makes a new, empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, TestPostgresError> {
        let mut createdb = self.command("createdb");
        createdb.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            name,
        ]);
        self.run(&format!("creating database {name}"), &mut createdb)?;
        Ok(self.url(name))
    }

    /// The URL of database `name` of this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        if let Some(mut server) = self.server.take() {
            let group = Pid::from_raw(server.id() as i32);
            // Fast shutdown (SIGINT) of the whole group; SIGKILL if it
            // lingers (only then: once reaped, its ID may be reused).
            let _ = killpg(group, Signal::SIGINT);
            let started = Instant::now();
            let mut exited = false;
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = server.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !exited {
                let _ = killpg(group, Signal::SIGKILL);
                let _ = server.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
