//! The configuration file parser and validator.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy::Config::fuzz_parse(data));
