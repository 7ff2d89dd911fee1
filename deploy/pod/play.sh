#!/usr/bin/env bash
# Starts a pod file with podman, in one command:
#   deploy/pod/play.sh [deploy/pod/tracker-dcs-sim.yaml]
# Builds the images if missing, creates the MQTT secret once (deploy/pod/make-secret.sh),
# generates the ConfigMaps from deploy/ (and deploy/grafana, deploy/node-red for the lab pod) and plays the pod (replacing a running one).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
file=${1:-$here/tracker-dcs-sim.yaml}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../../Cargo.toml" | head -n1)
missing=()
for img in $(sed -n 's#^ *image: localhost/tracker-dcs/\([^:]*\):.*#\1#p' "$file" | sort -u); do
  podman image exists "localhost/tracker-dcs/$img:$version" || missing+=("$img")
done
if [ ${#missing[@]} -gt 0 ]; then "$here/../build-images.sh" "${missing[@]}"; fi
podman secret inspect tracker-dcs-mqtt >/dev/null 2>&1 || "$here/make-secret.sh"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$here/configmap.sh" > "$tmp/config.yaml"
args=(--configmap "$tmp/config.yaml")
for extra in grafana node-red burnin; do
  if grep -A1 'configMap:' "$file" | grep -q "name: tracker-dcs-$extra\$"; then
    "$here/configmap.sh" "$extra" > "$tmp/$extra.yaml"
    args+=(--configmap "$tmp/$extra.yaml")
  fi
done
podman kube play --replace "${args[@]}" "$file"
