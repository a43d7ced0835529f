#!/usr/bin/env bash
# Builds every first-party plugin (each crate under plugins/ and examples/caption_cleanup) as
#   plugins/<name>.wasm   WASM component (cargo build --target wasm32-wasip2)
#   plugins/<name>.so     native library (cargo build --features native-export)
# where <name> is the crate's folder name (crop_resize, frame_skip, id_token, dora, loha, lokr,
# timestep_sampling, video_metrics, folder_reader, metadata_reader,
# caption_cleanup).
#
# Usage (from anywhere):  bash plugins/build.sh
# Environment:
#   COGVX_PLUGIN_PROFILE  cargo profile to build with (default: dev, which shares the
#                         workspace's build cache; `release` for optimised plugins)
#   CARGO_TARGET_DIR      honoured like cargo does (default: <repo>/target)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$(pwd)"

profile="${COGVX_PLUGIN_PROFILE:-dev}"
case "$profile" in
    dev) profile_dir=debug ;;
    *) profile_dir="$profile" ;;
esac
target_dir="${CARGO_TARGET_DIR:-$repo/target}"

# Folder name, package name and library file stem of every plugin crate.
names=() packages=() libs=()
for manifest in plugins/*/Cargo.toml examples/caption_cleanup/Cargo.toml; do
    [ -f "$manifest" ] || continue
    dir="$(dirname "$manifest")"
    package="$(sed -n '/^\[package\]/,/^\[/{s/^name *= *"\(.*\)".*/\1/p}' "$manifest" | head -n1)"
    lib="$(sed -n '/^\[lib\]/,/^\[/{s/^name *= *"\(.*\)".*/\1/p}' "$manifest" | head -n1)"
    if [ -z "$package" ]; then
        echo "plugins/build.sh: $manifest has no [package] name" >&2
        exit 1
    fi
    names+=("$(basename "$dir")")
    packages+=("$package")
    libs+=("${lib:-${package//-/_}}")
done
if [ "${#names[@]}" -eq 0 ]; then
    echo "plugins/build.sh: no plugin crates found under plugins/ or examples/caption_cleanup" >&2
    exit 1
fi

pkg_args=() feature_list=()
for p in "${packages[@]}"; do
    pkg_args+=(-p "$p")
    feature_list+=("$p/native-export")
done
features="$(IFS=,; echo "${feature_list[*]}")"

if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "plugins/build.sh: the wasm32-wasip2 target is missing; run: rustup target add wasm32-wasip2" >&2
    exit 1
fi

# Moves a built file into plugins/ atomically (a running cogvx may have the old one mapped).
install_plugin() {
    local from="$1" to="$2"
    if [ ! -f "$from" ]; then
        echo "plugins/build.sh: cargo did not produce $from" >&2
        exit 1
    fi
    cp "$from" "$to.tmp"
    mv -f "$to.tmp" "$to"
    echo "  $to"
}

echo "== plugins: native .so (profile $profile)"
cargo build --profile "$profile" --lib "${pkg_args[@]}" --features "$features"
# Copy at once: building a plugin crate later as a plain dependency rewrites these files.
for i in "${!names[@]}"; do
    install_plugin "$target_dir/$profile_dir/lib${libs[$i]}.so" "plugins/${names[$i]}.so"
done

echo "== plugins: WASM components (wasm32-wasip2, profile $profile)"
cargo build --profile "$profile" --lib "${pkg_args[@]}" --target wasm32-wasip2
for i in "${!names[@]}"; do
    install_plugin "$target_dir/wasm32-wasip2/$profile_dir/${libs[$i]}.wasm" "plugins/${names[$i]}.wasm"
done
