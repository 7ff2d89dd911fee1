#!/usr/bin/env bash
# Backs up the pod's volumes (podman named volumes) to tar files:
#   deploy/backup.sh [DIR] [VOLUME...]
# DIR defaults to ./backups/<date>; VOLUME defaults to every tracker-dcs volume.
# Stop the pod first for a consistent copy (`podman pod stop tracker-dcs-sim`): the
# telemetry spool is append-only and survives a copy taken while running, a database
# volume may not.
set -euo pipefail
dir=${1:-backups/$(date -u +%Y%m%dT%H%M%SZ)}
shift || true
if [ $# -gt 0 ]; then volumes=("$@"); else
  mapfile -t volumes < <(podman volume ls --format '{{.Name}}' | grep '^tracker-dcs' || true)
fi
[ ${#volumes[@]} -gt 0 ] || { echo "backup: no tracker-dcs volume found" >&2; exit 2; }
mkdir -p "$dir"
for v in "${volumes[@]}"; do
  podman volume export "$v" --output "$dir/$v.tar"
  echo "backup: $v -> $dir/$v.tar ($(du -h "$dir/$v.tar" | cut -f1))"
done
