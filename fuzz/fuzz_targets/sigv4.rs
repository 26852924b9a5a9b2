//! Fuzz target: SigV4 verification of arbitrary Authorization headers and requests (xks_proxy_fuzz::sigv4).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xks_proxy_fuzz::sigv4(data));
