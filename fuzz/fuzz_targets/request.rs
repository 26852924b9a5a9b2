#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xks_proxy_fuzz::request(data));
