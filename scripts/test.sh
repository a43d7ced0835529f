#!/usr/bin/env bash
# The project's test command (README "Contributing"): every crate's unit and integration tests,
# including the diffusers parity cases of ../shared/reference.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --no-fail-fast "$@"
