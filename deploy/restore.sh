#!/usr/bin/env bash
# Restores volumes saved by deploy/backup.sh:
#   deploy/restore.sh DIR [VOLUME...]
# Each DIR/<volume>.tar goes into the volume of that name, created if missing. The
# pod using it must be stopped (podman refuses otherwise); the volume's old content is
# replaced.
set -euo pipefail
dir=${1:?usage: deploy/restore.sh DIR [VOLUME...]}
shift
if [ $# -gt 0 ]; then volumes=("$@"); else
  volumes=(); for t in "$dir"/*.tar; do [ -e "$t" ] && volumes+=("$(basename "$t" .tar)"); done
fi
[ ${#volumes[@]} -gt 0 ] || { echo "restore: no .tar in $dir" >&2; exit 2; }
for v in "${volumes[@]}"; do
  [ -f "$dir/$v.tar" ] || { echo "restore: no $dir/$v.tar" >&2; exit 2; }
  if podman ps --format '{{.Mounts}}' | grep -q "$v"; then
    echo "restore: $v is in use by a running container: stop the pod first" >&2; exit 2
  fi
  if podman volume exists "$v"; then
    podman volume rm "$v" >/dev/null
  fi
  podman volume create "$v" >/dev/null
  podman volume import "$v" "$dir/$v.tar"
  echo "restore: $dir/$v.tar -> $v"
done
