#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sundara_fuzz::checks::tensor_validate(data));
