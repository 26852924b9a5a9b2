//! Fuzz target: the router on arbitrary methods and paths (xks_proxy_fuzz::router).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xks_proxy_fuzz::router(data));
