//! `proxyctl completions` and `proxyctl man`: the scripts are valid for their shells and
//! actually complete, the manual pages format without a single groff warning.
//!
//! zsh and fish are required under `./scripts/test` (which installs them); run by hand
//! without them, their checks are skipped with a message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const PROXYCTL: &str = env!("CARGO_BIN_EXE_proxyctl");

fn proxyctl(args: &[&str]) -> Output {
    let out = Command::new(PROXYCTL)
        .args(args)
        // No daemon runs: these commands must not need one.
        .env("PROXY_MGMT_SOCKET", "/nonexistent/mgmt.sock")
        .output()
        .expect("run proxyctl");
    assert!(
        out.status.success(),
        "proxyctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether `program` runs; when it does not, the test fails under `./scripts/test`
/// (`PROXY_TEST_REQUIRE_ALL`, or `CI`), as the proxy crate's tests do, else it is skipped.
fn installed(program: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0");
        assert!(
            !(set("PROXY_TEST_REQUIRE_ALL") || set("CI")),
            "{program} is missing but PROXY_TEST_REQUIRE_ALL/CI requires every test to run; scripts/test installs it"
        );
        eprintln!("SKIPPED: {program} is missing (Debian package {program}); set PROXY_TEST_REQUIRE_ALL=1 to fail instead");
    }
    found
}

/// Runs `script` in `shell`, returning its stdout; fails on a non-zero exit or stderr output.
fn run_shell(shell: &str, args: &[&str], script: &str) -> String {
    let out = Command::new(shell)
        .args(args)
        .arg(script)
        .output()
        .expect("run shell");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{shell} {args:?} {script}: status {:?}, stderr: {stderr}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bash_completion_parses_and_completes_subcommands_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxyctl.bash");
    std::fs::write(&file, proxyctl(&["completions", "bash"]).stdout).unwrap();
    let file = file.to_str().unwrap();
    run_shell("bash", &["-n"], file);

    // Load it as bash-completion would and ask for the words after `proxyctl rou` and
    // after `proxyctl routes `.
    let complete = |words: &str, cword: usize| {
        let script = format!(
            "source {file}\nCOMP_WORDS=({words})\nCOMP_CWORD={cword}\nCOMP_LINE=\"${{COMP_WORDS[*]}}\"\nCOMP_POINT=${{#COMP_LINE}}\n_proxyctl proxyctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\nprintf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        run_shell("bash", &["-c"], &script)
    };
    let first = complete("proxyctl rou", 1);
    assert_eq!(first.split_whitespace().collect::<Vec<_>>(), ["routes"]);
    let routes = complete("proxyctl routes ''", 2);
    for verb in ["list", "add", "rm", "import"] {
        assert!(
            routes.split_whitespace().any(|w| w == verb),
            "{verb} missing from {routes}"
        );
    }
    let shells = complete("proxyctl completions ''", 2);
    for shell in ["bash", "zsh", "fish"] {
        assert!(shells.split_whitespace().any(|w| w == shell), "{shells}");
    }
}

#[test]
fn zsh_completion_parses() {
    if !installed("zsh") {
        return;
    }
    let out = proxyctl(&["completions", "zsh"]).stdout;
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("#compdef proxyctl"), "{text:.80}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("_proxyctl");
    std::fs::write(&file, &text).unwrap();
    run_shell("zsh", &["-n"], file.to_str().unwrap());
}

#[test]
fn fish_completion_parses_and_completes() {
    if !installed("fish") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxyctl.fish");
    std::fs::write(&file, proxyctl(&["completions", "fish"]).stdout).unwrap();
    let file = file.to_str().unwrap();
    run_shell("fish", &["--no-execute"], file);
    let script = format!("source {file}; complete --do-complete 'proxyctl tcp-'");
    let out = run_shell("fish", &["--no-config", "-c"], &script);
    assert!(out.lines().any(|l| l.starts_with("tcp-routes")), "{out}");
}

/// Formats a page with groff, all warnings on; returns the text.
fn format_page(page: &Path) -> String {
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-P-cbou", "-ww", "-rLL=100n"])
        .arg(page)
        .output()
        .expect("run groff");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "groff {}: {stderr}",
        page.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn man_page_formats_without_warnings_and_covers_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("proxyctl.1");
    std::fs::write(&page, proxyctl(&["man"]).stdout).unwrap();
    let text = format_page(&page);
    for heading in ["NAME", "SYNOPSIS", "OPTIONS", "SUBCOMMANDS"] {
        assert!(text.contains(heading), "{heading} missing:\n{text}");
    }
    for sub in [
        "routes",
        "pools",
        "upstreams",
        "tls",
        "top",
        "completions",
        "man",
    ] {
        assert!(
            text.contains(&format!("proxyctl-{sub}(1)")),
            "{sub} missing:\n{text}"
        );
    }

    // --dir writes the top page and one per subcommand, nested ones included.
    let pages = dir.path().join("pages");
    proxyctl(&["man", "--dir", pages.to_str().unwrap()]);
    for name in [
        "proxyctl.1",
        "proxyctl-routes.1",
        "proxyctl-routes-add.1",
        "proxyctl-tls.1",
    ] {
        let text = format_page(&pages.join(name));
        assert!(text.contains("SYNOPSIS"), "{name}:\n{text}");
    }
    let add = format_page(&pages.join("proxyctl-routes-add.1"));
    assert!(add.contains("--pool"), "{add}");
}
