//! The hand-over wire decoder: what a child reads as its parent's offer, and what a parent
//! reads as its child's `HELLO` and `READY`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy::upgrade::fuzz_handoff_read(data));
