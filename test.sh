#!/usr/bin/env bash
# Every test guardblk has: lints, unit tests, libblkio end-to-end tests, and QEMU guest tests.
# Needs the packages .ci/run installs (QEMU 7.2, busybox-static, cpio, ...); the guest test
# downloads the Debian cloud kernel itself.
set -euo pipefail
cd "$(dirname "$0")"

cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test
bash guest-tests/run.sh
