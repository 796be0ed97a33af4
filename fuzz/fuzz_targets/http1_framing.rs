//! The HTTP/1 head and chunked-body framing scanner, fed in pieces of varying size.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy::http::framing::fuzz_scan(data));
