//! The CSV import's fuzz target body runs on stable over the checked-in seed corpus and
//! regression inputs in `fuzz/`, each input whole and cut at every length.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

#[test]
fn routes_csv_corpus() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut seen = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join("routes_csv")) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            for end in 0..=bytes.len() {
                let input = &bytes[..end];
                if std::panic::catch_unwind(|| proxyctl::csv_routes::fuzz_parse(input)).is_err() {
                    panic!("{} cut at {end} panics", path.display());
                }
            }
            seen += 1;
        }
    }
    assert!(seen > 0, "no routes_csv inputs");
}

/// The seed file is a real import: its rows become routes with defaults filled in.
#[test]
fn the_migration_seed_is_a_valid_import() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/routes_csv/migration");
    let text = std::fs::read(&path).unwrap();
    let defaults = proxyctl::csv_routes::Defaults {
        listener: Some("edge".into()),
        pool: None,
    };
    let routes = proxyctl::csv_routes::parse(&text[..], "migration", &defaults).unwrap();
    assert_eq!(routes.len(), 2);
    assert_eq!(routes[0].host.as_deref(), Some("shop.example"));
    assert!(routes[0].strip_prefix);
    assert_eq!(routes[0].priority, 10);
    assert_eq!(routes[1].listener, "edge");
    assert_eq!(routes[1].path_prefix.as_deref(), Some("/b"));
}
