#!/usr/bin/env bash
# The main job on a fresh machine, in one command: installs what is missing
# (scripts/setup.sh), builds the release binary and the first-party plugins, and trains the
# quickstart LoRA (configs/quickstart.toml: the tiny example model and the four example clips,
# on the CPU). Run again with nothing changed, the set-up and the builds are no-ops.
# Extra arguments go to `cogvx train` (e.g. --max-steps 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p cogvx
bash plugins/build.sh
exec target/release/cogvx --config configs/quickstart.toml train "$@"
