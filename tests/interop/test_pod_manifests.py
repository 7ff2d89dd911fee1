"""The pod files of deploy/pod/ against the Kubernetes schema (kubernetes-validate,
strict: unknown fields are errors) and against the deployment rules of SPEC 8: pinned
images, non-root, capabilities dropped, no privilege escalation, ports on 127.0.0.1,
state in PersistentVolumeClaims, credentials only from the Secret that make-secret.sh
writes, configs only from the generated ConfigMap."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
POD_DIR = REPO / "deploy" / "pod"
POD_FILES = [POD_DIR / "tracker-dcs.yaml", POD_DIR / "tracker-dcs-sim.yaml"]
VALIDATE = Path(sys.executable).with_name("kubernetes-validate")


def validate(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VALIDATE), "--strict", "--quiet", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )


def configmap(tmp_path: Path, *which: str) -> Path:
    out = tmp_path / f"configmap{'-'.join(('',) + which)}.yaml"
    out.write_text(subprocess.run([str(POD_DIR / "configmap.sh"), *which], capture_output=True, text=True, check=True).stdout)
    return out


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def secret_keys() -> set[str]:
    """The Secret's keys as make-secret.sh writes them: one `<account>-password` per
    service account in accounts=(...), then the fixed keys of keys+=(...)."""
    text = (POD_DIR / "make-secret.sh").read_text()
    accounts = re.search(r"^accounts=\(([^)]*)\)", text, re.M)
    fixed = re.search(r"^keys\+=\(([^)]*)\)", text, re.M)
    assert accounts and fixed, "make-secret.sh lists accounts=(...) and keys+=(...)"
    return {f"{a}-password" for a in accounts.group(1).split()} | set(fixed.group(1).split())


@pytest.mark.parametrize("path", POD_FILES, ids=lambda p: p.name)
def test_schema_valid_for_kubernetes(path: Path, tmp_path: Path) -> None:
    r = validate(path, configmap(tmp_path), configmap(tmp_path, "grafana"), configmap(tmp_path, "node-red"),
                 configmap(tmp_path, "burnin"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_schema_check_catches_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((POD_DIR / "tracker-dcs-sim.yaml").read_text().replace("imagePullPolicy:", "imagePulPolicy:", 1))
    r = validate(bad)
    assert r.returncode != 0
    assert "imagePulPolicy" in r.stdout + r.stderr


@pytest.mark.parametrize("path", POD_FILES, ids=lambda p: p.name)
def test_deployment_rules(path: Path, tmp_path: Path) -> None:
    objs = docs(path)
    pods = [d for d in objs if d["kind"] == "Pod"]
    assert len(pods) == 1
    spec = pods[0]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    claims = {d["metadata"]["name"] for d in objs if d["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for v in volumes.values():
        assert set(v) & {"persistentVolumeClaim", "configMap", "emptyDir"}, f"volume {v} (no hostPath)"
        if "persistentVolumeClaim" in v:
            assert v["persistentVolumeClaim"]["claimName"] in claims
    cm = docs(configmap(tmp_path))[0]
    keys = secret_keys()
    for c in spec["containers"]:
        name = c["name"]
        image = c["image"]
        assert re.search(r":[0-9][\w.-]*$", image) and not image.endswith(":latest"), f"{name}: pinned image, got {image}"
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert sc.get("runAsUser", 65532) != 0, name
        if image.startswith("localhost/tracker-dcs/"):
            assert c["imagePullPolicy"] == "Never", name
            assert sc["readOnlyRootFilesystem"] is True, name
            binary = image.split("/")[-1].split(":")[0]
            assert (REPO / "deploy" / "containers" / binary / "Containerfile").is_file(), name
            config = c["args"][c["args"].index("--config") + 1]
            assert Path(config).name in cm["data"], f"{name}: {config} not in the ConfigMap"
        for p in c.get("ports", []):
            assert p.get("hostIP") == "127.0.0.1", f"{name}: port {p} published beyond 127.0.0.1"
        for e in c.get("env", []):
            assert "password" not in e.get("value", "").lower(), f"{name}: literal secret in {e}"
            # Ours read DCS_*/service-specific names in capitals; a typo is silently unused.
            if image.startswith("localhost/tracker-dcs/"):
                assert re.fullmatch(r"[A-Z][A-Z0-9_]*", e["name"]), f"{name}: env name {e['name']!r}"
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "tracker-dcs-mqtt" and ref["key"] in keys, f"{name}: {ref}"
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{name}: mounts unknown volume {m['name']}"


def test_configmap_is_the_deploy_files(tmp_path: Path) -> None:
    cm = docs(configmap(tmp_path))[0]
    for key, text in cm["data"].items():
        src = POD_DIR / key if key == "broker.yaml" else REPO / "deploy" / key
        expected = "\n".join(line.rstrip() for line in src.read_text().splitlines()) + "\n"
        assert text == expected, key


def test_burnin_configmap_is_deploy_burnin(tmp_path: Path) -> None:
    """The sequences ConfigMap holds every sequence file of deploy/burnin as it is, and the
    burnin containers read them where they mount it."""
    (cm,) = docs(configmap(tmp_path, "burnin"))
    files = sorted(p.name for p in (REPO / "deploy" / "burnin").glob("*.yaml"))
    assert sorted(cm["data"]) == files
    for name in files:
        src = REPO / "deploy" / "burnin" / name
        assert cm["data"][name] == "\n".join(l.rstrip() for l in src.read_text().splitlines()) + "\n"
    for path in POD_FILES:
        spec = [d for d in docs(path) if d["kind"] == "Pod"][0]["spec"]
        (c,) = [c for c in spec["containers"] if c["name"] == "burnin"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vol = {v["name"]: v for v in spec["volumes"]}[mounts[env["DCS_BURNIN_SEQUENCES"]]]
        assert vol["configMap"]["name"] == "tracker-dcs-burnin", path.name


def test_systemd_unit_for_start_at_boot(tmp_path: Path) -> None:
    """install-systemd.sh writes a unit systemd accepts, pointing at this checkout."""
    env = {"PATH": "/usr/bin:/bin", "UNIT_DIR": str(tmp_path), "NO_ENABLE": "1", "HOME": str(tmp_path)}
    pod = POD_DIR / "tracker-dcs-sim.yaml"
    subprocess.run([str(POD_DIR / "install-systemd.sh"), str(pod)], env=env, check=True, capture_output=True)
    unit = tmp_path / "tracker-dcs.service"
    text = unit.read_text()
    assert f"ExecStart={POD_DIR / 'play.sh'} {pod}" in text
    assert f"ExecStop=/usr/bin/podman kube down {pod}" in text
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_configmap_is_deploy_grafana(tmp_path: Path) -> None:
    """The lab pod's Grafana gets the provisioning of deploy/grafana, every file in place."""
    (cm,) = docs(configmap(tmp_path, "grafana"))
    grafana = REPO / "deploy" / "grafana"
    sources = {
        "datasource-influxdb.yaml": grafana / "provisioning/datasources/influxdb.yaml",
        "dashboards-dcs.yaml": grafana / "provisioning/dashboards/dcs.yaml",
    }
    sources.update({f"dashboard-{f.name}": f for f in (grafana / "dashboards").glob("*.json")})
    assert set(cm["data"]) == set(sources)
    for key, src in sources.items():
        expected = "\n".join(line.rstrip() for line in src.read_text().splitlines()) + "\n"
        assert cm["data"][key] == expected, key
    pod = next(d for d in docs(POD_DIR / "tracker-dcs.yaml") if d["kind"] == "Pod")
    volume = next(v for v in pod["spec"]["volumes"] if v.get("configMap", {}).get("name") == "tracker-dcs-grafana")
    paths = {i["key"]: i["path"] for i in volume["configMap"]["items"]}
    assert set(paths) == set(sources), "every Grafana file is mounted"
    for key, src in sources.items():
        assert paths[key] == src.relative_to(grafana).as_posix(), key
    c = next(c for c in pod["spec"]["containers"] if c["name"] == "grafana")
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])
    assert env["GF_PATHS_PROVISIONING"] == f"{mount['mountPath']}/provisioning"
    assert env["GRAFANA_DASHBOARDS_DIR"] == f"{mount['mountPath']}/dashboards"
    assert {"DCS_INFLUX_URL", "DCS_INFLUX_DATABASE", "DCS_INFLUX_USERNAME", "DCS_INFLUX_PASSWORD"} <= set(env)


def test_node_red_gets_the_shipped_panel(tmp_path: Path) -> None:
    """The lab pod's Node-RED runs deploy/node-red: flows, credentials references and
    settings from the ConfigMap, the dashboard version of package.json, the operator's
    MQTT account from the Secret."""
    (cm,) = docs(configmap(tmp_path, "node-red"))
    panel = REPO / "deploy" / "node-red"
    assert set(cm["data"]) == {"flows.json", "flows_cred.json", "settings.js"}
    for key, text in cm["data"].items():
        expected = "\n".join(line.rstrip() for line in (panel / key).read_text().splitlines()) + "\n"
        assert text == expected, key
    json.loads(cm["data"]["flows.json"])
    pod = next(d for d in docs(POD_DIR / "tracker-dcs.yaml") if d["kind"] == "Pod")
    volume = next(v for v in pod["spec"]["volumes"] if v.get("configMap", {}).get("name") == "tracker-dcs-node-red")
    c = next(c for c in pod["spec"]["containers"] if c["name"] == "node-red")
    mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])["mountPath"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_RED_FLOW_FILE"]["value"] == f"{mount}/flows.json"
    assert env["DCS_MQTT_USERNAME"]["value"] == "operator"
    assert env["DCS_MQTT_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "operator-password"
    script = " ".join(c["args"])
    assert f"--settings {mount}/settings.js" in script
    version = json.loads((panel / "package.json").read_text())["dependencies"]["@flowfuse/node-red-dashboard"]
    assert f"@flowfuse/node-red-dashboard@{version}" in script and f'"version": "{version}"' in script


@pytest.mark.parametrize("path", POD_FILES, ids=lambda p: p.name)
def test_the_notifier_names_its_station(path: Path) -> None:
    """deploy/notifier.yaml takes the station from DCS_STATION; every message names it."""
    assert "${DCS_STATION" in (REPO / "deploy/notifier.yaml").read_text()
    pod = next(d for d in docs(path) if d["kind"] == "Pod")
    c = next(c for c in pod["spec"]["containers"] if c["name"] == "notifier")
    assert any(e["name"] == "DCS_STATION" and e.get("value") for e in c["env"]), c["env"]
