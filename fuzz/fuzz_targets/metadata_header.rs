#![no_main]
// See guardblk::fuzzing::metadata_header for what this target feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| guardblk::fuzzing::metadata_header(data));
