#!/usr/bin/env bash
# Every test guardblk has: lints (rustfmt, clippy, shellcheck), unit tests, libblkio end-to-end
# tests, and QEMU guest tests.
# Needs the packages .ci/run installs (QEMU 7.2, busybox-static, cpio, ...); the guest test
# downloads the Debian cloud kernel itself.
set -euo pipefail
cd "$(dirname "$0")"

cargo fmt --check
cargo clippy --all-targets -- -D warnings
# The guest-test tools are a Cargo project of their own (built offline, like run.sh does).
(cd guest-tests/tools && cargo fmt --check &&
    CARGO_TARGET_DIR="$PWD/target" cargo clippy --offline --all-targets -- -D warnings)
# Every shell script, each checked from its own directory (they source siblings by path).
mapfile -t scripts < <(find . \( -name target -o -name work -o -name .git \) -prune -o -name '*.sh' -print)
for script in "${scripts[@]}" .ci/run; do
    (cd "$(dirname "$script")" && shellcheck -x "$(basename "$script")")
done
cargo test
bash guest-tests/run.sh
