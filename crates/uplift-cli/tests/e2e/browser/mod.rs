//! A real browser for the web console's tests: Debian's headless chromium,
//! driven over WebDriver by chromium-driver, with waits that name what an
//! operator waited for and save a screenshot when it never came.

#![allow(dead_code)]

use crate::common::WAIT;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thirtyfour::prelude::*;

/// The browser's window: the width the console must be readable at, and a
/// phone's.
pub const DESKTOP: (u32, u32) = (1280, 900);
pub const PHONE: (u32, u32) = (390, 844);

pub struct Browser {
    pub driver: WebDriver,
    chromedriver: Child,
    shots: PathBuf,
    base: String,
}

impl Browser {
    pub async fn start(base: &str) -> Self {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let chromedriver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // Its own process group, so that the browsers it starts go
            // with it when a failed test drops it (see Drop).
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (apt-get install chromium chromium-driver; .ci/run does)");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {url}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut caps = DesiredCapabilities::chrome();
        if Path::new("/usr/bin/chromium").exists() {
            caps.set_binary("/usr/bin/chromium").unwrap();
        }
        for arg in [
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            &format!("--window-size={},{}", DESKTOP.0, DESKTOP.1),
        ] {
            caps.add_arg(arg).unwrap();
        }
        // The server's certificate is from its own CA, which this browser
        // profile does not hold; the connection is still TLS.
        caps.accept_insecure_certs(true).unwrap();
        let driver = WebDriver::new(&url, caps)
            .await
            .expect("a chromium session");
        let shots =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/web-console-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Self {
            driver,
            chromedriver,
            shots,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    pub async fn open(&self, hash: &str) {
        self.driver
            .goto(format!("{}/{hash}", self.base))
            .await
            .unwrap();
    }

    /// Changes the view as a click on a link would: no page load.
    pub async fn go(&self, hash: &str) {
        self.driver
            .execute(&format!("location.hash = {hash:?}"), vec![])
            .await
            .unwrap();
    }

    pub async fn shot(&self, name: &str) {
        let path = self.shots.join(format!("{name}.png"));
        self.driver.screenshot(&path).await.unwrap();
    }

    /// The text of the first element `css` selects, once it exists and
    /// `ok` holds for its text; fails naming `what` with the last text seen
    /// (and a screenshot) if that does not happen within [`WAIT`].
    pub async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        self.until(what, || async {
            let text = match self.driver.find(By::Css(css)).await {
                Ok(element) => element.text().await.unwrap_or_default(),
                Err(_) => return Err(format!("`{css}` selects nothing")),
            };
            if ok(&text) {
                Ok(text)
            } else {
                Err(format!("`{css}` reads {text:?}"))
            }
        })
        .await
    }

    /// Polls `probe` until it answers `Ok`; after [`WAIT`], saves a
    /// screenshot and fails with `what` and the probe's last `Err`.
    async fn until<T, F>(&self, what: &str, mut probe: impl FnMut() -> F) -> T
    where
        F: std::future::Future<Output = Result<T, String>>,
    {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = match probe().await {
                Ok(done) => return done,
                Err(last) => last,
            };
            if Instant::now() > deadline {
                self.shot(&format!("failed-{}", what.replace(' ', "-")))
                    .await;
                panic!("{what}: still {last} after {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Scrolls so that `css` is in view (screenshots show the viewport).
    pub async fn scroll_to(&self, css: &str) {
        let element = self.driver.find(By::Css(css)).await.unwrap();
        element.scroll_into_view().await.unwrap();
    }

    pub async fn count(&self, css: &str) -> usize {
        self.driver.find_all(By::Css(css)).await.unwrap().len()
    }

    pub async fn wait_count(&self, css: &str, what: &str, ok: impl Fn(usize) -> bool) -> usize {
        self.until(what, || async {
            let n = self.count(css).await;
            if ok(n) {
                Ok(n)
            } else {
                Err(format!("`{css}` selects {n} elements"))
            }
        })
        .await
    }

    pub async fn click(&self, css: &str) {
        self.wait_count(css, &format!("{css} appears"), |n| n > 0)
            .await;
        self.driver
            .find(By::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    pub async fn fill(&self, css: &str, text: &str) {
        self.wait_count(css, &format!("{css} appears"), |n| n > 0)
            .await;
        let input = self.driver.find(By::Css(css)).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys(text).await.unwrap();
    }

    pub async fn login(&self, token: &str) {
        self.fill("#token", token).await;
        self.click("#login-form button[type=submit]").await;
    }

    pub async fn resize(&self, (width, height): (u32, u32)) {
        self.driver
            .set_window_rect(0, 0, width, height)
            .await
            .unwrap();
    }

    /// Clicks `css`, which asks "are you sure?", and says yes.
    pub async fn click_confirmed(&self, css: &str) {
        self.click(css).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.driver.accept_alert().await.is_err() {
            assert!(Instant::now() < deadline, "{css} asked no confirmation");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn quit(self) {
        let _ = self.driver.clone().quit().await;
    }
}

impl Drop for Browser {
    /// A test that fails mid-way must not leave chromedriver and its
    /// browsers running: the whole process group goes.
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.chromedriver.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.chromedriver.wait();
    }
}
