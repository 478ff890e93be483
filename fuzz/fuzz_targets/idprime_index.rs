#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cardbridge::fuzz::idprime_index(data));
