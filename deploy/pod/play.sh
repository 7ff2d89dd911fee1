#!/usr/bin/env bash
# Starts a pod file with podman, in one command:
#   deploy/pod/play.sh [deploy/pod/tracker-dcs-sim.yaml]
# Builds the images if missing, creates the MQTT secret once (deploy/pod/make-secret.sh),
# generates the ConfigMap from deploy/*.yaml and plays the pod (replacing a running one).
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
cm=$(mktemp); trap 'rm -f "$cm"' EXIT
"$here/configmap.sh" > "$cm"
podman kube play --replace --configmap "$cm" "$file"
