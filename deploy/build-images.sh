#!/usr/bin/env bash
# Builds one container image per binary, localhost/tracker-dcs/<name>:<version>, from
# static binaries (FROM scratch: no base image, no registry needed).
#   deploy/build-images.sh            # all images
#   deploy/build-images.sh julabo     # some
# STATIC_TARGET_DIR (default target/static) keeps the static build apart from the
# normal one; CONTAINERS_CONF is honoured by podman.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
target=x86_64-unknown-linux-gnu
static_dir=${STATIC_TARGET_DIR:-target/static}

if [ $# -gt 0 ]; then names=("$@"); else
  names=(); for d in deploy/containers/*/; do names+=("$(basename "$d")"); done
fi
# Binary -> package that builds it.
package() {
  case "$1" in
    dcs-broker) echo dcs-broker ;; caen-fsm) echo caen ;; *) echo "$1" ;;
  esac
}
pkgs=(); for n in "${names[@]}"; do
  [ -f "deploy/containers/$n/Containerfile" ] || { echo "build-images: no deploy/containers/$n/Containerfile" >&2; exit 2; }
  pkgs+=(-p "$(package "$n")")
done

echo "build-images: static release build of ${names[*]} (version $version, revision $revision)"
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked \
  --target "$target" --target-dir "$static_dir" "${pkgs[@]}"

ctx=$(mktemp -d); trap 'rm -rf "$ctx"' EXIT
for n in "${names[@]}"; do
  rm -rf "${ctx:?}"/*; mkdir "$ctx/state"
  cp "$static_dir/$target/release/$n" "$ctx/"
  podman build --quiet --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    -t "localhost/tracker-dcs/$n:$version" -f "deploy/containers/$n/Containerfile" "$ctx" >/dev/null
  size=$(podman image inspect --format '{{.Size}}' "localhost/tracker-dcs/$n:$version")
  echo "build-images: localhost/tracker-dcs/$n:$version ($((size / 1024 / 1024)) MiB)"
done
