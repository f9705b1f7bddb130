//! Runs the device's own commands: the health check after a trial boot, and
//! the install hooks.

use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

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
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let waited = tokio::time::timeout(limit, async {
        let mut out = Vec::new();
        let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut out).await;
        (child.wait().await, out)
    })
    .await;
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
