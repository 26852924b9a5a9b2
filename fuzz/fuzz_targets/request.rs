//! Fuzz target: the four XKS operations parsing and validating a request body (xks_proxy_fuzz::request).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xks_proxy_fuzz::request(data));
