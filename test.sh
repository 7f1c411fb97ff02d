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
(cd fuzz && cargo fmt --check)
# Every shell script, each checked from its own directory (they source siblings by path).
mapfile -t scripts < <(find . \( -name target -o -name work -o -name .git \) -prune -o -name '*.sh' -print)
for script in "${scripts[@]}" .ci/run; do
    (cd "$(dirname "$script")" && shellcheck -x "$(basename "$script")")
done
cargo test
# Fuzz targets (fuzz/README.md): the seed corpus from the unit test that checks it, then each
# target for a bounded time on the stable toolchain.
GUARDBLK_WRITE_FUZZ_SEEDS="$PWD/fuzz/corpus" cargo test --lib fuzz_seeds
fuzz_log=$(mktemp)
for target in descriptor_chains request_path metadata_header saved_state vhost_messages; do
    if ! (cd fuzz && cargo fuzz run --sanitizer none -O "$target" -- \
        -max_total_time="${GUARDBLK_FUZZ_SECONDS:-20}") >"$fuzz_log" 2>&1; then
        tail -n 40 "$fuzz_log"
        echo "fuzz target $target failed (a finding is in fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    echo "fuzz $target: $(grep -E '^Done' "$fuzz_log")"
done
rm -f "$fuzz_log"
bash guest-tests/run.sh
