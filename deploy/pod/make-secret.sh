#!/usr/bin/env bash
# Creates the MQTT credentials of a pod, never in the repo:
#  - the podman secret `tracker-dcs-mqtt` (keys: <account>-password for each service
#    account, named as the service's MQTT client id so that dcs-broker reserves that
#    id to it: dcs (caen-fsm), julabo, MARTA (marta), interlock, notifier, telemetry,
#    env-sim, ph2acf;
#    passwd: the broker's password file with those accounts and `operator`;
#    operator-password (the Node-RED panel logs in as `operator`);
#    permit-key: the key interlock/permits is signed with (interlock, caen-fsm);
#    influxdb-admin-password, influxdb-password (user `telemetry`),
#    grafana-admin-password, mongodb-password (user `admin`): used by
#    tracker-dcs.yaml);
#  - in $TRACKER_DCS_SECRETS (default ~/.config/tracker-dcs, mode 0700):
#    `mqtt-operator.secret` (the operator's password, for dashboards and
#    mosquitto_sub) and `tracker-dcs-secret.yaml` (the same Secret for a Kubernetes
#    cluster: `kubectl apply -f`).
# Refuses to replace an existing secret unless --force (running pods keep the old one
# until they are played again). Needs the dcs-broker image (deploy/build-images.sh),
# which hashes the passwords (PBKDF2-SHA512, as mosquitto_passwd).
set -euo pipefail
cd "$(dirname "$0")/../.."
force=no; [ "${1:-}" = "--force" ] && force=yes
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
image="localhost/tracker-dcs/dcs-broker:$version"
out=${TRACKER_DCS_SECRETS:-$HOME/.config/tracker-dcs}
name=${TRACKER_DCS_SECRET_NAME:-tracker-dcs-mqtt}

if podman secret inspect "$name" >/dev/null 2>&1; then
  if [ "$force" = no ]; then
    echo "make-secret: podman secret $name exists; --force replaces it" >&2; exit 2
  fi
  podman secret rm "$name" >/dev/null
fi
podman image exists "$image" || { echo "make-secret: no $image: run deploy/build-images.sh dcs-broker" >&2; exit 2; }

random() { head -c 18 /dev/urandom | base64 | tr '+/' '-_'; }
hash() { printf '%s\n' "$2" | podman run --rm -i --network none "$image" --hash-user "$1"; }
accounts=(dcs julabo MARTA interlock notifier telemetry env-sim ph2acf burnin)
operator_pw=$(random)
keys=(); values=(); passwd=""
for a in "${accounts[@]}"; do
  pw=$(random)
  keys+=("$a-password"); values+=("$pw")
  passwd+="$(hash "$a" "$pw")"$'\n'
done
passwd+="$(hash operator "$operator_pw")"$'\n'
b64() { printf '%s' "$1" | base64 -w0; }

keys+=(passwd operator-password permit-key influxdb-admin-password influxdb-password grafana-admin-password mongodb-password)
values+=("$passwd" "$operator_pw" "$(head -c 32 /dev/urandom | base64)" "$(random)" "$(random)" "$(random)" "$(random)")

umask 077
mkdir -p "$out"
# podman 4.3 reads secretKeyRef values from a JSON map of base64 strings.
json="{"; yaml=""
for i in "${!keys[@]}"; do
  [ "$i" -gt 0 ] && json+=","
  json+="\"${keys[$i]}\":\"$(b64 "${values[$i]}")\""
  yaml+="  ${keys[$i]}: $(b64 "${values[$i]}")"$'\n'
done
json+="}"
printf '%s' "$json" | podman secret create "$name" - >/dev/null
printf '%s\n' "$operator_pw" > "$out/mqtt-operator.secret"
{
  echo "apiVersion: v1"
  echo "kind: Secret"
  echo "metadata:"
  echo "  name: $name"
  echo "type: Opaque"
  echo "data:"
  printf '%s' "$yaml"
} > "$out/tracker-dcs-secret.yaml"
echo "make-secret: podman secret $name created; operator password in $out/mqtt-operator.secret"
