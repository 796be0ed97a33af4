//! The fuzz targets' bodies (plain library functions) run on stable over the checked-in
//! seed corpus and the regression inputs in `fuzz/`, so every CI run exercises them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

/// Every file of `fuzz/corpus/<target>` and `fuzz/regressions/<target>`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            out.push((path, bytes));
        }
    }
    assert!(!out.is_empty(), "no inputs for {target}");
    out
}

/// Runs `body` on every input and on every prefix of it (truncated inputs are the
/// commonest mutation), naming the file that fails.
fn run(target: &str, body: fn(&[u8])) {
    for (path, bytes) in inputs(target) {
        for end in 0..=bytes.len() {
            let input = &bytes[..end];
            if std::panic::catch_unwind(|| body(input)).is_err() {
                panic!("{target}: {} cut at {end} panics", path.display());
            }
        }
    }
}

#[test]
fn http1_framing_corpus() {
    run("http1_framing", proxy::http::framing::fuzz_scan);
}

#[test]
fn client_hello_corpus() {
    run("client_hello", proxy::tls::sni::fuzz_client_hello);
}

#[test]
fn config_corpus() {
    run("config", proxy::Config::fuzz_parse);
}

#[test]
fn handoff_corpus() {
    run("handoff", proxy::upgrade::fuzz_handoff_read);
}

/// The seed ClientHellos are real: whole, or re-cut into 64-byte records, they name
/// their server.
#[tokio::test]
async fn seed_client_hellos_name_their_server() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/client_hello");
    for seed in ["openssl-sni", "split-records"] {
        let bytes = std::fs::read(root.join(seed)).unwrap();
        let (read, hello) =
            proxy::tls::sni::peek_client_hello(&mut &bytes[..], std::time::Duration::from_secs(5))
                .await
                .unwrap();
        assert_eq!(read, bytes, "{seed}");
        assert_eq!(
            hello,
            proxy::tls::sni::Hello::ClientHello(Some("shop.example.test".into())),
            "{seed}"
        );
    }
}
