//! Route rules as CSV, the file `proxyctl routes import` reads: a header row naming the
//! columns, one route per row, `#` lines skipped. Errors name the file, line and column.

use std::collections::HashMap;
use std::io::Read;

use anyhow::{bail, Context, Result};

use crate::document::Route;

/// Values for cells a file leaves empty.
#[derive(Default)]
pub struct Defaults {
    /// Listener.
    pub listener: Option<String>,
    /// Pool.
    pub pool: Option<String>,
}

const COLUMNS: &[&str] = &[
    "name",
    "listener",
    "host",
    "path_prefix",
    "path",
    "path_exact",
    "pool",
    "strip_prefix",
    "priority",
];

/// Parses the CSV text into routes; errors say `file:line: column: reason`.
pub fn parse(input: impl Read, file: &str, defaults: &Defaults) -> Result<Vec<Route>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .flexible(false)
        .from_reader(input);
    let headers: Vec<String> = reader
        .headers()
        .with_context(|| format!("{file}: cannot read the header row"))?
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    for h in &headers {
        if !COLUMNS.contains(&h.as_str()) {
            bail!(
                "{file}:1: unknown column {h:?} (known: {})",
                COLUMNS.join(", ")
            );
        }
    }
    if !headers.iter().any(|h| h == "name") {
        bail!("{file}:1: a `name` column is required");
    }
    let mut routes = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("{file}: malformed CSV"))?;
        let line = record.position().map_or(0, |p| p.line());
        let cell = |column: &str| -> Option<String> {
            headers
                .iter()
                .position(|h| h == column)
                .and_then(|i| record.get(i))
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let required = |column: &str, default: &Option<String>| -> Result<String> {
            cell(column)
                .or_else(|| default.clone())
                .with_context(|| format!("{file}:{line}: {column}: missing"))
        };
        let name = required("name", &None)?;
        if let Some(first) = seen.insert(name.clone(), line) {
            bail!("{file}:{line}: name: {name:?} already used on line {first}");
        }
        let strip_prefix = match cell("strip_prefix").as_deref() {
            None | Some("false" | "no" | "0") => false,
            Some("true" | "yes" | "1") => true,
            Some(other) => {
                bail!("{file}:{line}: strip_prefix: expected true or false, got {other:?}")
            }
        };
        let priority = match cell("priority") {
            None => 0,
            Some(p) => p
                .parse()
                .with_context(|| format!("{file}:{line}: priority: not an integer: {p:?}"))?,
        };
        let path_prefix = cell("path_prefix").or_else(|| cell("path"));
        let path_exact = cell("path_exact");
        if path_prefix.is_some() && path_exact.is_some() {
            bail!("{file}:{line}: path_exact: set together with a path prefix");
        }
        routes.push(Route {
            listener: required("listener", &defaults.listener)?,
            pool: required("pool", &defaults.pool)?,
            host: cell("host"),
            path_prefix: path_prefix.or_else(|| path_exact.is_none().then(|| "/".to_owned())),
            path_exact,
            name,
            source: None,
            strip_prefix,
            priority,
        });
    }
    Ok(routes)
}

/// A fuzzing entry: any bytes either parse into routes or give an error that names the
/// file; nothing panics.
#[doc(hidden)]
pub fn fuzz_parse(data: &[u8]) {
    let defaults = Defaults {
        listener: Some("web".into()),
        pool: None,
    };
    match parse(data, "fuzz.csv", &defaults) {
        Ok(routes) => {
            for route in routes {
                assert!(!route.name.is_empty());
                assert!(route.path_prefix.is_some() != route.path_exact.is_some());
            }
        }
        Err(e) => assert!(e.to_string().starts_with("fuzz.csv"), "{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_take_defaults_and_report_lines() {
        let text = "name,path,pool\nmove-a,/a,v2\n# a comment\nmove-b,/b,\n";
        let defaults = Defaults {
            listener: Some("web".into()),
            pool: Some("v1".into()),
        };
        let routes = parse(text.as_bytes(), "rules.csv", &defaults).expect("valid");
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].pool, "v2");
        assert_eq!(routes[1].pool, "v1");
        assert_eq!(routes[1].listener, "web");
        assert_eq!(routes[1].path_prefix.as_deref(), Some("/b"));

        let err = parse("name,pool\nx,\n".as_bytes(), "r.csv", &Defaults::default())
            .expect_err("listener missing");
        assert_eq!(err.to_string(), "r.csv:2: listener: missing");
    }

    #[test]
    fn duplicates_and_unknown_columns_are_refused() {
        let dup = "name,listener,pool\na,web,p\na,web,p\n";
        let err = parse(dup.as_bytes(), "r.csv", &Defaults::default()).expect_err("duplicate");
        assert!(err.to_string().contains("already used on line 2"), "{err}");
        let err = parse("name,colour\n".as_bytes(), "r.csv", &Defaults::default())
            .expect_err("unknown column");
        assert!(err.to_string().contains("unknown column"), "{err}");
    }
}
