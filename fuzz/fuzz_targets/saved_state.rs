#![no_main]
// See guardblk::fuzzing::saved_state for what this target feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| guardblk::fuzzing::saved_state(data));
