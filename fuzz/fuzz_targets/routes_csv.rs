//! `proxyctl routes import`'s CSV parser.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxyctl::csv_routes::fuzz_parse(data));
