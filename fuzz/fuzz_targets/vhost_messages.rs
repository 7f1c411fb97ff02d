#![no_main]
// See guardblk::fuzzing::vhost_messages for what this target feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| guardblk::fuzzing::vhost_messages(data));
