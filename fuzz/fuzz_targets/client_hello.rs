//! The ClientHello server-name parser of `tls-passthrough` listeners.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxy::tls::sni::fuzz_client_hello(data));
