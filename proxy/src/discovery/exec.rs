//! The `exec` source: runs a command on an interval and reads its JSON member list.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::{parse_members, Feed};
use crate::state::Upstream;

/// Largest output read from the command; more is a bad output.
const MAX_OUTPUT: usize = 4 * 1024 * 1024;
/// Most of the command's stderr kept for the failure message.
const MAX_STDERR: usize = 64 * 1024;

/// Runs the command every `interval`, forever.
pub(super) async fn run(command: Vec<String>, interval: Duration, timeout: Duration, feed: Feed) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match run_once(&command, timeout).await {
            Ok(upstreams) => feed.publish(upstreams).await,
            Err(reason) => feed.fail(reason),
        }
    }
}

async fn run_once(command: &[String], timeout: Duration) -> Result<Vec<Upstream>, String> {
    let Some((program, args)) = command.split_first() else {
        return Err("empty command".into());
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A command that outlives its timeout (or prints too much) is killed, not left
        // behind.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(format!("{program}: no output pipes"));
    };
    // Both pipes are read while the command runs, each with its cap: a command that
    // prints without end costs at most MAX_OUTPUT bytes and is stopped at once.
    let read_stdout = async {
        let mut out = Vec::new();
        stdout
            .take(MAX_OUTPUT as u64 + 1)
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("{program}: {e}"))?;
        if out.len() > MAX_OUTPUT {
            return Err(format!("{program} printed more than {MAX_OUTPUT} bytes"));
        }
        Ok(out)
    };
    let read_stderr = async {
        let mut err = Vec::new();
        // What is beyond the cap is not read; the message is for the log only.
        let _ = stderr.take(MAX_STDERR as u64).read_to_end(&mut err).await;
        Ok::<_, String>(err)
    };
    let run = async {
        let (stdout, stderr) = tokio::try_join!(read_stdout, read_stderr)?;
        let status = child.wait().await.map_err(|e| format!("{program}: {e}"))?;
        Ok::<_, String>((status, stdout, stderr))
    };
    let (status, stdout, stderr) = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("{program} did not finish within {timeout:?}"))??;
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr);
        return Err(format!("{program} exited with {status}: {}", stderr.trim()));
    }
    let text =
        String::from_utf8(stdout).map_err(|_| format!("{program} printed non-UTF-8 output"))?;
    parse_members(&text).map_err(|e| format!("{program} output: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn endless_output_is_cut_at_the_cap_while_reading() {
        // `yes` never ends: only a cap applied while reading stops it before the timeout.
        let err = run_once(&sh("yes 0123456789"), Duration::from_secs(30))
            .await
            .expect_err("too much output");
        assert!(err.contains("more than"), "{err}");
    }

    #[tokio::test]
    async fn output_within_the_cap_is_parsed_and_stderr_kept_for_failures() {
        let ok = run_once(
            &sh(r#"echo '[{"address": "127.0.0.1:9"}]'"#),
            Duration::from_secs(30),
        )
        .await
        .expect("members");
        assert_eq!(ok.len(), 1);
        let err = run_once(&sh("echo broken >&2; exit 3"), Duration::from_secs(30))
            .await
            .expect_err("failure");
        assert!(err.contains("broken"), "{err}");
    }
}
