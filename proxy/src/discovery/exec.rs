//! The `exec` source: runs a command on an interval and reads its JSON member list.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::{parse_members, Feed};
use crate::state::Upstream;

/// Largest output read from the command; more is a bad output.
const MAX_OUTPUT: usize = 4 * 1024 * 1024;

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
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A command that outlives its timeout is killed, not left behind.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} did not finish within {timeout:?}"))?
        .map_err(|e| format!("{program}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "{program} exited with {}: {}",
            output.status,
            stderr.trim()
        ));
    }
    if output.stdout.len() > MAX_OUTPUT {
        return Err(format!("{program} printed more than {MAX_OUTPUT} bytes"));
    }
    let text = String::from_utf8(output.stdout)
        .map_err(|_| format!("{program} printed non-UTF-8 output"))?;
    parse_members(&text).map_err(|e| format!("{program} output: {e}"))
}
