#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cardbridge::fuzz::minidriver_cmapfile(data));
