#!/usr/bin/env bash
# The project's test command (README "Build and test"; .ci/run calls it): installs what is
# missing (scripts/setup.sh), builds the first-party plugins (.so and .wasm, which the tests
# load) and runs every crate's unit and integration tests, including the diffusers parity
# cases of ../shared/reference (a missing fixture fails the test naming it). Run again with
# nothing changed, the set-up and the builds are no-ops. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash plugins/build.sh
cargo test --workspace --no-fail-fast "$@"
