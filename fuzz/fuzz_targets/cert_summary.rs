#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cardbridge::fuzz::cert_summary(data));
