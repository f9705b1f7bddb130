//! Runs the device's own commands: the health check after a trial boot, and
//! the install hooks.

use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// How much of a command's stderr is kept for the error message.
const TAIL_BYTES: usize = 4096;

/// `Ok` when the health check exits 0 within the time limit; otherwise a
/// reason that names the command, its status and the end of what it printed.
pub async fn run(command: &[String], limit: Duration) -> Result<(), String> {
    run_command("health check", command, &[], limit).await
}

/// Runs `command` as the `label` step, with extra environment variables.
pub async fn run_command(
    label: &str,
    command: &[String],
    env: &[(&str, String)],
    limit: Duration,
) -> Result<(), String> {
    let (program, args) = command
        .split_first()
        .ok_or(format!("no {label} command configured"))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {label} {program:?}: {e}"))?;
    // Drain stderr while waiting, keeping only its tail: a chatty command
    // must not block on a full pipe, and a background child that keeps the
    // pipe open must not hold up the result once the command has exited.
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = tail.clone();
    let drain = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let mut kept = sink.lock().unwrap_or_else(|p| p.into_inner());
            kept.extend_from_slice(&buf[..n]);
            let excess = kept.len().saturating_sub(TAIL_BYTES);
            kept.drain(..excess);
        }
    });
    let waited = tokio::time::timeout(limit, child.wait()).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), drain).await;
    let out = tail.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let waited = waited.map(|status| (status, out));
    match waited {
        Err(_) => Err(format!(
            "{label} {program:?} did not finish within {}s",
            limit.as_secs()
        )),
        Ok((Err(e), _)) => Err(format!("{label} {program:?} could not be waited for: {e}")),
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), out)) => {
            let text = String::from_utf8_lossy(&out);
            let tail: String = text
                .trim()
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if tail.is_empty() {
                Err(format!("{label} {program:?} exited with {status}"))
            } else {
                Err(format!("{label} {program:?} exited with {status}: {tail}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn exit_zero_is_healthy_anything_else_says_why() {
        assert_eq!(run(&sh("exit 0"), Duration::from_secs(5)).await, Ok(()));
        let err = run(
            &sh("echo 'database unreachable' >&2; exit 3"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("exit status: 3") && err.contains("database unreachable"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_hanging_check_fails_at_its_time_limit() {
        let err = run(&sh("sleep 30"), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("did not finish"), "{err}");
    }

    #[tokio::test]
    async fn a_chatty_check_neither_hangs_nor_floods_the_message() {
        let script = "head -c 1000000 /dev/zero | tr '\\0' x >&2; echo 'the end' >&2; exit 4";
        let err = run(&sh(script), Duration::from_secs(20)).await.unwrap_err();
        assert!(
            err.contains("exit status: 4") && err.contains("the end"),
            "{}",
            &err[err.len().saturating_sub(200)..]
        );
        assert!(
            err.len() < 1000,
            "only the tail is kept: {} bytes",
            err.len()
        );
    }

    #[tokio::test]
    async fn a_background_child_holding_stderr_does_not_hold_up_the_result() {
        let started = std::time::Instant::now();
        assert_eq!(
            run(&sh("sleep 5 & exit 0"), Duration::from_secs(20)).await,
            Ok(())
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn hooks_see_their_environment_and_are_named_in_errors() {
        let env = [("UPLIFT_VERSION", "1.1".to_owned())];
        let err = run_command(
            "pre-install hook",
            &sh("echo \"refusing $UPLIFT_VERSION\" >&2; exit 1"),
            &env,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(
            err.starts_with("pre-install hook") && err.contains("refusing 1.1"),
            "{err}"
        );
    }
}
