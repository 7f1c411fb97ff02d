#![no_main]
// See guardblk::fuzzing::request_path for what this target feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| guardblk::fuzzing::request_path(data));
