//! `proxyd completions` and `proxyd man`: valid for their shells, and manual pages that
//! groff formats without a warning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

const PROXYD: &str = env!("CARGO_BIN_EXE_proxyd");

fn proxyd(args: &[&str]) -> Output {
    let out = Command::new(PROXYD)
        .args(args)
        .output()
        .expect("run proxyd");
    assert!(
        out.status.success(),
        "proxyd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn check(program: &str, args: &[&str], file: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .arg(file)
        .output()
        .expect("run checker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{program} {args:?} {}: {stderr}",
        file.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed(program: &str) -> bool {
    common::external_program(program, &format!("Debian package {program}")).is_some()
}

#[test]
fn completions_are_valid_for_each_shell() {
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("proxyd.bash");
    std::fs::write(&bash, proxyd(&["completions", "bash"]).stdout).unwrap();
    check("bash", &["-n"], &bash);
    let text = std::fs::read_to_string(&bash).unwrap();
    for word in ["check-config", "default-config", "completions", "--config"] {
        assert!(text.contains(word), "{word} missing from the bash script");
    }
    if installed("zsh") {
        let zsh = dir.path().join("_proxyd");
        std::fs::write(&zsh, proxyd(&["completions", "zsh"]).stdout).unwrap();
        check("zsh", &["-n"], &zsh);
    }
    if installed("fish") {
        let fish = dir.path().join("proxyd.fish");
        std::fs::write(&fish, proxyd(&["completions", "fish"]).stdout).unwrap();
        check("fish", &["--no-execute"], &fish);
    }
}

#[test]
fn man_pages_format_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("proxyd.1");
    std::fs::write(&page, proxyd(&["man"]).stdout).unwrap();
    let text = check("groff", &["-man", "-Tutf8", "-P-cbou", "-ww"], &page);
    for word in [
        "SYNOPSIS",
        "--config",
        "proxyd-check-config(1)",
        "proxyd-man(1)",
    ] {
        assert!(text.contains(word), "{word} missing:\n{text}");
    }
    let pages = dir.path().join("pages");
    proxyd(&["man", "--dir", pages.to_str().unwrap()]);
    let check_config = check(
        "groff",
        &["-man", "-Tutf8", "-P-cbou", "-ww"],
        &pages.join("proxyd-check-config.1"),
    );
    assert!(
        check_config.contains("Validate a config file"),
        "{check_config}"
    );
}
