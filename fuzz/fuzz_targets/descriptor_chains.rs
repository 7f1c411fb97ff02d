#![no_main]
// See guardblk::fuzzing::descriptor_chains for what this target feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| guardblk::fuzzing::descriptor_chains(data));
