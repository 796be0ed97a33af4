//! The HTTP/1 head and chunked-body framing model, fed in pieces of varying size, and the
//! HTTP/1 codec held to it on the same bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy::http::framing::fuzz_scan(data));
