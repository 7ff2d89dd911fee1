#!/usr/bin/env bash
# Starts a pod file with podman, in one command:
#   deploy/pod/play.sh [deploy/pod/tracker-dcs-sim.yaml]
# Builds the images if missing, creates the MQTT secret once (deploy/pod/make-secret.sh),
# generates the ConfigMaps from deploy/ (and deploy/grafana for the lab pod) and plays the pod (replacing a running one).
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
cm=$(mktemp); gcm=$(mktemp); trap 'rm -f "$cm" "$gcm"' EXIT
"$here/configmap.sh" > "$cm"
args=(--configmap "$cm")
if grep -q 'name: tracker-dcs-grafana' "$file"; then
  "$here/configmap.sh" grafana > "$gcm"
  args+=(--configmap "$gcm")
fi
podman kube play --replace "${args[@]}" "$file"
