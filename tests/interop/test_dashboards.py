"""The operator's tools against the running stack (`dcs up --simulate` + InfluxDB):

- the Node-RED control panel (deploy/node-red, real Node-RED and dashboard package from
  npm), driven in headless Chromium like an operator: controls change the simulated
  hardware and the replies reach the panel;
- docs/mqtt.asyncapi.yaml: a valid AsyncAPI 3.0 document, and every payload the running
  services publish validates against the schema of its channel;
- deploy/grafana: the provisioning parses and every query names measurements, fields
  and tags the forwarder and the bridge really wrote to InfluxDB.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO_ROOT
from stack import NodeRed, Observer, Stack, wait_until

CHROMIUM = Path("/usr/bin/chromium")
ASYNCAPI = REPO_ROOT / "docs" / "mqtt.asyncapi.yaml"
ASYNCAPI_SCHEMA = REPO_ROOT / "tests" / "node_modules" / "@asyncapi" / "specs" / "schemas" / "3.0.0-without-$id.json"
GRAFANA = REPO_ROOT / "deploy" / "grafana"
WAIT = 60.0  # a state change through broker, service and simulator on a busy machine


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def node_red(stack, tmp_path_factory):
    n = NodeRed(tmp_path_factory.mktemp("node-red"), stack)
    yield n
    n.stop()


@pytest.fixture(scope="module")
def page(node_red):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian chromium is not installed (apt-get install chromium)"
    with sync_playwright() as p:
        # Playwright gives the browser a new empty profile of its own.
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )
        pg = browser.new_page(viewport={"width": 1400, "height": 2000})
        pg.goto(f"{node_red.url}/ui/control")
        pg.wait_for_selector("text=LV on", timeout=WAIT * 1000)
        yield pg
        browser.close()


def body(page) -> str:
    return page.inner_text("body")


def wait_panel(page, text: str, log) -> None:
    wait_until(f"`{text}` on the panel", lambda: text in body(page), WAIT, interval=0.3,
               log=lambda: body(page)[-3000:] + "\n--- node-red ---\n" + log())


def pick(page, label: str, option: str) -> None:
    page.locator(".v-select", has_text=label).first.click()
    page.get_by_role("option", name=option, exact=True).click()


def click(page, name: str) -> None:
    page.get_by_role("button", name=name, exact=True).click()


def test_panel_drives_the_simulated_lab(stack, node_red, page):
    obs = stack.observer
    log = node_red.proc.text
    # Live state reaches the panel: retained statuses and the panel's own connection.
    wait_panel(page, "LV_OFF", log)
    wait_until("the panel connected to the broker",
               lambda: re.search(r"Panel to broker\s+connected", body(page)), WAIT, log=log)

    # Opening the page fills in the channel, set-point-in-use and pump forms (channel 0,
    # LV, on): that must never send them.
    def selected(label):
        return page.locator(".v-select", has_text=label).first.locator("input").first.input_value()

    wait_until("the form defaults on the page",
               lambda: (selected("Pump stage"), selected("Channel")) == ("1", "0"), WAIT, log=log)
    time.sleep(1)
    sent = [m.topic for m in obs.snapshot()
            if m.topic in ("dcs/cmd/switch/lv/0", "julabo/cmd/useSP", "julabo/cmd/setPress")]
    assert not sent, f"opening the panel sent {sent}"

    # HV before LV: refused by caen-fsm, the refusal shown on the panel, nothing moves.
    t0 = time.monotonic()
    click(page, "HV on")
    reply = obs.wait_json("dcs/reply", lambda r: r["topic"] == "dcs/cmd/switch/hv", WAIT, since=t0)
    assert reply["ok"] is False and "LV" in reply["error"], reply
    wait_panel(page, "REFUSED dcs/cmd/switch/hv", log)
    assert obs.latest_json("dcs/status")["fsm_state"] == "LV_OFF"

    # Chiller: set-point 1 to 15 C through the form (above the simulated dew point plus
    # the interlock's margin, so no dew-point alarm interferes), then start.
    t0 = time.monotonic()
    pick(page, "* Set-point", "1")
    page.get_by_label("Temperature (C)").fill("15")
    click(page, "Set temperature")
    obs.wait_json("julabo/status", lambda s: s.get("setpoint_1") == 15.0, WAIT, since=t0, log=stack.log)
    click(page, "Start")
    obs.wait_json("julabo/status", lambda s: s.get("running") is True and s["fsm_state"] == "ON",
                  WAIT, since=t0, log=stack.log)
    wait_panel(page, "OK julabo/cmd/start", log)

    # LV on: once the interlock sees the chiller circulating, the supply switches on.
    def lv_on():
        t = time.monotonic()
        click(page, "LV on")
        r = obs.wait_json("dcs/reply", lambda r: r["topic"] == "dcs/cmd/switch/lv", WAIT, since=t)
        return r["ok"]

    wait_until("LV on accepted (interlock permit after the chiller starts)", lv_on, WAIT,
               interval=2, log=stack.log)
    obs.wait_json("dcs/status", lambda s: s["fsm_state"] == "LV_ON", WAIT, since=t0, log=stack.log)
    wait_panel(page, "LV_ON", log)

    # One channel: set LV of channel 1 to 12.5 V; read back from the simulated PV.
    t0 = time.monotonic()
    pick(page, "Channel", "1")
    pick(page, "Supply", "LV")
    pick(page, "Action", "set voltage")
    page.get_by_label("Set voltage (V)").fill("12.5")
    click(page, "Send")
    obs.wait_json("dcs/channels", lambda c: str(c["id"]) == "1" and c["lv_setV"] == 12.5,
                  WAIT, since=t0, log=stack.log)
    wait_panel(page, "OK dcs/cmd/setv/lv/1", log)
    # Out of the configured limits: refused with the reason, shown to the operator.
    page.get_by_label("Set voltage (V)").fill("99")
    click(page, "Send")
    wait_panel(page, "REFUSED dcs/cmd/setv/lv/1", log)

    # A calibration from the allowlist of deploy/ph2acf.yaml runs on the simulator.
    t0 = time.monotonic()
    pick(page, "Calibration", "pedenoise")
    pick(page, "Configuration", "PS_module")
    page.get_by_label("Modules (comma-separated)").fill("PS_26_05-IBA_00001")
    page.get_by_label("Operator").fill("panel_test")
    click(page, "Run")
    status = obs.wait_json("ph2acf/status", lambda s: s["state"] == "running", WAIT, since=t0, log=stack.log)
    wait_panel(page, "OK ph2acf/cmd/run", log)
    wait_panel(page, status["run_id"], log)
    done = obs.wait_json("ph2acf/status", lambda s: s["state"] == "idle" and s.get("last_run"),
                         WAIT, since=t0, log=stack.log)
    assert done["last_run"]["run_id"] == status["run_id"]
    assert done["last_run"]["status"] == "done", done

    # MARTA: CO2 refused before the chiller; chiller, a set-point through the form, CO2.
    t0 = time.monotonic()
    click(page, "Start CO2")
    wait_panel(page, "REFUSED MARTA/cmd/start_co2", log)
    click(page, "Start chiller")
    obs.wait_json("MARTA/status", lambda s: s["fsm_state"] == "CHILLER_RUNNING", WAIT, since=t0, log=stack.log)
    page.get_by_label("CO2 set-point, degC").fill("-20")
    click(page, "Set MARTA set-points")
    obs.wait_json("MARTA/status", lambda s: s.get("temperature_setpoint") == -20.0, WAIT, since=t0, log=stack.log)
    click(page, "Start CO2")
    obs.wait_json("MARTA/status", lambda s: s["fsm_state"] == "CO2_RUNNING", WAIT, since=t0, log=stack.log)
    wait_panel(page, "CO2_RUNNING", log)
    wait_panel(page, "OK MARTA/cmd/start_co2", log)

    # Shelving from the panel: the interlock takes it, the panel shows who and why, and
    # the unshelve form ends it.
    t0 = time.monotonic()
    pick(page, "Alarm to shelve", "dew_point")
    page.get_by_label("Minutes (at most 1440)").fill("30")
    page.get_by_label("Shelved by").fill("panel_test")
    page.get_by_label("Reason").fill("dry-air line swapped")
    click(page, "Shelve")
    obs.wait_json("alarms/summary", lambda s: "dew_point" in s.get("shelved", {}), WAIT, since=t0, log=stack.log)
    wait_panel(page, "shelved: dew_point by panel_test", log)
    wait_panel(page, "OK alarms/cmd/shelve", log)
    t1 = time.monotonic()
    pick(page, "Alarm to unshelve", "dew_point")
    page.get_by_label("Shelve ended by").fill("panel_test")
    click(page, "Unshelve")
    obs.wait_json("alarms/summary", lambda s: s.get("shelved") == {}, WAIT, since=t1, log=stack.log)
    wait_panel(page, "OK alarms/cmd/unshelve", log)

    # Every service is listed as online in the services table.
    def rows():
        return [r.split() for r in page.locator("tr").all_inner_texts()]

    # The channel table follows dcs/channels: module channels on, the spare one off.
    wait_until("channel rows on the panel", lambda: any(r[:3] == ["1", "module_1", "LV_ON"] for r in rows())
               and any(r[:2] == ["3", "LV_OFF"] for r in rows()), WAIT, log=lambda: str(rows()))

    services = ["dcs", "julabo", "MARTA", "interlock", "telemetry", "ph2acf", "env-sim", "dcs-launcher",
                "burnin"]
    wait_until("every service online on the panel",
               lambda: all([svc, "online"] in rows() for svc in services), WAIT,
               log=lambda: str(rows()))
    assert not any("OFFLINE" in r for r in rows()), rows()

    # Burn-in from the panel: the start form sends what burnin accepts (deploy/burnin/short.yaml
    # on module_0, a CAEN module of deploy/caen.yaml), the status reaches the panel, an
    # operator's pause shows its reason and ETA, a resume, an abort with its reason (HV, then
    # LV off on channel 0), and a refusal shown under the burn-in section.
    def panel_has(pattern):
        wait_until(f"/{pattern}/ on the panel", lambda: re.search(pattern, body(page)), WAIT, interval=0.3,
                   log=lambda: body(page)[-3000:] + "\n--- dcs up ---\n" + stack.log())

    t0 = time.monotonic()
    pick(page, "Burn-in sequence", "short")
    page.get_by_label("Modules under test (comma-separated)").fill("module_0")
    page.get_by_label("Started by").fill("panel_test")
    click(page, "Start burn-in")
    reply = obs.wait_json("burnin/reply", lambda r: r["topic"] == "burnin/cmd/start", WAIT, since=t0, log=stack.log)
    assert reply["ok"] is True, reply
    started = next(m for m in obs.snapshot() if m.topic == "burnin/cmd/start" and m.at >= t0)
    assert json.loads(started.payload) == {"sequence": "short", "modules": ["module_0"],
                                           "operator": "panel_test", "comment": ""}, started.payload
    run = obs.wait_json("burnin/status", lambda s: s["state"] == "running", WAIT, since=t0, log=stack.log)
    assert (run["sequence"], run["modules"], run["operator"]) == ("short", ["module_0"], "panel_test"), run
    wait_panel(page, run["run_id"], log)
    wait_panel(page, "OK burnin/cmd/start", log)

    t1 = time.monotonic()
    page.get_by_label("Paused by").fill("panel_test")
    page.get_by_label("Why pause").fill("panel pause test")
    click(page, "Pause burn-in")
    paused = obs.wait_json("burnin/status", lambda s: s["state"] == "paused", WAIT, since=t1, log=stack.log)
    assert paused["pause"]["by_operator"] is True, paused
    assert paused["pause"]["reason"] == "paused by panel_test: panel pause test", paused
    step = paused["step"]
    panel_has(r"Burn-in state\s+paused")
    panel_has(r"Burn-in phase\s+paused")
    panel_has(rf"Burn-in step\s+{re.escape(step['path'])} \({step['index'] + 1} of {step['total']}\)")
    panel_has(r"Burn-in pause\s+paused by panel_test: panel pause test, since \d{4}-\d\d-\d\d \d\d:\d\d")
    panel_has(rf"Burn-in progress\s+{paused['progress']:.1f} %")
    panel_has(r"Burn-in ETA\s+\d{4}-\d\d-\d\d \d\d:\d\d.* \(in \d+")

    t2 = time.monotonic()
    page.get_by_label("Resumed by").fill("panel_test")
    click(page, "Resume burn-in")
    reply = obs.wait_json("burnin/reply", lambda r: r["topic"] == "burnin/cmd/resume", WAIT, since=t2, log=stack.log)
    assert reply["ok"] is True, reply
    # Lifted, but the run waits for resume.hold_secs of normal conditions first.
    obs.wait_json("burnin/status", lambda s: s["pause"] is not None and s["pause"]["by_operator"] is False,
                  WAIT, since=t2, log=stack.log)

    t3 = time.monotonic()
    page.get_by_label("Aborted by").fill("panel_test")
    page.get_by_label("Why abort").fill("panel abort test")
    click(page, "Abort burn-in")
    ended = obs.wait_json("burnin/status", lambda s: s["state"] == "aborted", WAIT, since=t3, log=stack.log)
    assert ended["reason"] == "aborted by panel_test: panel abort test", ended
    panel_has(r"Burn-in state\s+aborted \(aborted by panel_test: panel abort test\)")
    panel_has(r"Burn-in ETA\s+ended \d{4}-")
    # Nothing to resume any more: refused, and the refusal shown in the burn-in section.
    click(page, "Resume burn-in")
    panel_has(r"Last burn-in refusal\s+\d\d:\d\d:\d\d UTC resume refused: the run is aborted, not paused")


def test_panel_offers_what_the_services_allow():
    """The panel's dropdowns are the allowlists of the configs it commands."""
    flows = json.loads((REPO_ROOT / "deploy/node-red/flows.json").read_text())
    ph2 = yaml.safe_load((REPO_ROOT / "deploy/ph2acf.yaml").read_text())
    caen = yaml.safe_load((REPO_ROOT / "deploy/caen.yaml").read_text())
    forms = {n["id"]: n for n in flows if n["type"] == "ui-form"}

    def options(form, key):
        return [o["value"] for o in forms[form]["dropdownOptions"] if o["dropdown"] == key]

    assert options("form-ph2acf-run", "calibration") == ph2["calibrations"]
    assert options("form-ph2acf-run", "config") == list(ph2["configs"])
    assert sorted(options("form-channel", "channel")) == sorted(caen["channels"])
    interlock = yaml.safe_load((REPO_ROOT / "deploy/interlock.yaml").read_text())
    for form in ("form-alarm-shelve", "form-alarm-unshelve"):
        assert options(form, "rule") == list(interlock["rules"]), form
    # Burn-in: every sequence file of burnin.yaml's sequences_dir, and nothing else.
    burnin = yaml.safe_load((REPO_ROOT / "deploy/burnin.yaml").read_text())
    # `${DCS_BURNIN_SEQUENCES:-burnin}`: the pods set the variable, the shipped default is burnin/.
    seq_dir = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", burnin["sequences_dir"])
    sequences = sorted(f.stem for f in (REPO_ROOT / "deploy" / seq_dir).glob("*.yaml"))
    assert sequences, "no sequence files in deploy/burnin"
    assert sorted(options("form-burnin-start", "sequence")) == sequences

    # One subscription per topic: the broker sends a message once per matching filter of a
    # connection, so overlapping `mqtt in` filters (burnin/reply beside +/reply) would show
    # every reply twice.
    def overlap(a: str, b: str) -> bool:
        a_levels, b_levels = a.split("/"), b.split("/")
        for i in range(max(len(a_levels), len(b_levels))):
            x = a_levels[i] if i < len(a_levels) else None
            y = b_levels[i] if i < len(b_levels) else None
            if "#" in (x, y):
                return True
            if x is None or y is None or (x != y and "+" not in (x, y)):
                return False
        return True

    subs = [(n["id"], n["broker"], n["topic"]) for n in flows if n["type"] == "mqtt in"]
    for i, (id_a, broker_a, a) in enumerate(subs):
        for id_b, broker_b, b in subs[i + 1:]:
            assert broker_a != broker_b or not overlap(a, b), f"{id_a} ({a}) and {id_b} ({b}) overlap"
    # Credentials: only references to the environment, never a secret.
    cred = json.loads((REPO_ROOT / "deploy/node-red/flows_cred.json").read_text())
    for node_cred in cred.values():
        for v in node_cred.values():
            assert re.fullmatch(r"\$\{[A-Z_]+\}", v), f"a literal credential in flows_cred.json: {v!r}"
    broker = next(n for n in flows if n["type"] == "mqtt-broker")
    assert broker["broker"] == "${DCS_MQTT_HOST}" and broker["port"] == "${DCS_MQTT_PORT}"


# --------------------------------------------------------------------------- AsyncAPI


def load_asyncapi() -> dict:
    return yaml.safe_load(ASYNCAPI.read_text())


def test_asyncapi_document_is_valid_asyncapi_3():
    doc = load_asyncapi()
    assert doc["asyncapi"] == "3.0.0"
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message[:300]}" for e in errors[:10])


def resolve(doc: dict, node):
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        node = doc
        for part in ref[2:].split("/"):
            node = node[part]
    return node


def inline_refs(doc: dict, node):
    """The schema with every local $ref replaced by its target (the schemas have no cycles)."""
    node = resolve(doc, node)
    if isinstance(node, dict):
        return {k: inline_refs(doc, v) for k, v in node.items()}
    if isinstance(node, list):
        return [inline_refs(doc, v) for v in node]
    return node


def channel_patterns(doc: dict):
    """(regex, channel name, payload schemas, operations' retain flags) per channel."""
    out = []
    for name, ch in doc["channels"].items():
        ch = resolve(doc, ch)
        levels = []
        for level in ch["address"].split("/"):
            levels.append("[^/]+" if re.fullmatch(r"\{[^}]+\}", level) else re.escape(level))
        schemas = [inline_refs(doc, resolve(doc, m).get("payload", {}))
                   for m in ch.get("messages", {}).values()]
        retains = set()
        for op in doc.get("operations", {}).values():
            op = resolve(doc, op)
            if op["channel"]["$ref"] == f"#/channels/{name}" and op["action"] == "send":
                retain = op.get("bindings", {}).get("mqtt", {}).get("retain")
                if retain is not None:
                    retains.add(bool(retain))
        out.append((re.compile("^" + "/".join(levels) + "$"), name, schemas, retains))
    # Literal addresses win over patterns (dcs/cmd/clear before dcs/cmd/{verb}).
    out.sort(key=lambda c: c[0].pattern.count("[^/]+"))
    return out


def as_instance(payload: bytes):
    text = payload.decode("utf-8")
    try:
        v = json.loads(text)
    except ValueError:
        return text
    # Bare values (`on`, `21.7`, `true`) are documented as text payloads.
    return v if isinstance(v, (dict, list)) else text


def test_published_payloads_match_the_asyncapi_contract(stack):
    doc = load_asyncapi()
    channels = channel_patterns(doc)
    obs = stack.observer
    # Commands of every service, good and bad, so replies of both kinds are captured. The
    # bad ones break the contract on purpose and are not checked; the panel's commands
    # (captured during the panel test) and the good ones are.
    bad = [("dcs/cmd/switch/hv", "maybe"), ("julabo/cmd/setWT", '{"setpoint": 9, "temp": 1}'),
           ("ph2acf/cmd/run", '{"calibration": "rm -rf /"}'),
           ("burnin/cmd/start", '{"sequence": "../etc/passwd", "modules": ["module_0"], "operator": "ci"}')]
    good = [("dcs/cmd/refresh", ""), ("julabo/cmd/refresh", ""), ("ph2acf/cmd/refresh", ""),
            ("interlock/cmd/refresh", ""), ("alarms/cmd/ack", "all"), ("dcs-launcher/cmd/refresh", ""),
            ("MARTA/cmd/refresh", ""), ("MARTA/cmd/set_flow_active", "1"), ("burnin/cmd/refresh", ""),
            ("alarms/cmd/shelve", '{"rule": "dew_point", "minutes": 1, "by": "ci", "reason": "contract test"}'),
            ("alarms/cmd/unshelve", '{"rule": "dew_point", "by": "ci"}')]
    for topic, payload in bad + good:
        obs.publish(topic, payload)
    unchecked = {(t, p.encode()) for t, p in bad}
    # telemetry/stats every 10 s; sensors, chiller and channels stream meanwhile.
    wait_until("telemetry/stats", lambda: any(m.topic == "telemetry/stats" for m in obs.snapshot()),
               WAIT, log=stack.log)
    time.sleep(3)
    captured = obs.snapshot()
    problems, seen = [], set()
    for m in captured:
        if (m.topic, m.payload) in unchecked:
            continue
        match = next((c for c in channels if c[0].match(m.topic)), None)
        if match is None:
            problems.append(f"{m.topic}: no channel in docs/mqtt.asyncapi.yaml")
            continue
        _, name, schemas, _ = match
        seen.add(name)
        inst = as_instance(m.payload)
        errs = [list(jsonschema.Draft7Validator(s).iter_errors(inst)) for s in schemas]
        if schemas and all(errs):
            best = min(errs, key=len)
            problems.append(f"{m.topic} ({name}): {best[0].message[:200]} at {list(best[0].path)}; "
                            f"payload {m.payload[:200]!r}")
    assert not problems, f"{len(problems)} payloads break the contract:\n" + "\n".join(sorted(set(problems))[:20])
    # Retained flags: a late subscriber gets exactly the topics documented as retained.
    late = Observer(stack.mqtt_port, stack.username, stack.password)
    time.sleep(3)
    retained_now = {m.topic for m in late.snapshot() if m.retain}
    late.stop()
    for topic in sorted({m.topic for m in captured if "/cmd/" not in m.topic}):
        match = next((c for c in channels if c[0].match(topic)), None)
        if match is None or not match[3]:
            continue
        documented = True in match[3]
        if documented != (topic in retained_now):
            problems.append(f"{topic} ({match[1]}): documented retain={documented}, "
                            f"broker {'holds' if topic in retained_now else 'does not hold'} it")
    assert not problems, "retained flags differ from the contract:\n" + "\n".join(problems)
    # The capture covered the topics dashboards depend on.
    must = ["dcs/status", "dcs/channels", "dcs/reply", "julabo/status", "julabo/reply",
            "ph2acf/status", "ph2acf/reply", "telemetry/stats", "interlock/status",
            "interlock/permits", "alarms/summary", "alarms/reply", "dcs-launcher/status",
            "ESP01/sensors/BME/temp", "dcs/online", "MARTA/status", "MARTA/alarms", "MARTA/reply",
            "burnin/status", "burnin/reply", "burnin/online"]
    missing = [t for t in must if not any(c[0].match(t) and c[1] in seen for c in channels)]
    assert not missing, f"never captured: {missing}"


# --------------------------------------------------------------------------- Grafana


QUERY_FROM = re.compile(r'FROM\s+"([^"]+)"')
QUOTED = re.compile(r'"([^"]+)"')


def dashboard_queries():
    """(dashboard file, query text) for every panel target, annotation and variable."""
    out = []
    for f in sorted((GRAFANA / "dashboards").glob("*.json")):
        d = json.loads(f.read_text())

        def walk(node):
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "query" and isinstance(v, str) and "FROM" in v.upper():
                        out.append((f.name, v))
                    else:
                        walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(d)
    return out


def test_grafana_provisioning_is_well_formed():
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/influxdb.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "influxdb" and source["uid"] == "dcs-influxdb"
    # Site settings from the environment, no secret in the file.
    assert source["url"].startswith("$") and "$" in source["jsonData"]["dbName"]
    for v in source.get("secureJsonData", {}).values():
        assert v.startswith("$"), "a literal secret in the datasource file"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/dcs.yaml").read_text())
    assert providers["providers"][0]["type"] == "file"
    uids = set()
    for f in sorted((GRAFANA / "dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        assert d["uid"] not in uids, f"{f.name}: duplicate uid"
        uids.add(d["uid"])
        text = f.read_text()
        for ref in re.findall(r'"datasource":\s*\{[^}]*"uid":\s*"([^"]+)"', text):
            assert ref in ("dcs-influxdb", "-- Grafana --", "grafana"), f"{f.name}: unknown datasource {ref}"
    names = {f.name for f in (GRAFANA / "dashboards").glob("*.json")}
    assert {"module-channels.json", "chiller.json", "environment.json", "forwarder-health.json",
            "marta.json"} <= names
    # Calibration runs are annotations on the dashboards of the lab's state.
    for f in ["module-channels.json", "chiller.json", "environment.json", "marta.json"]:
        ann = json.loads((GRAFANA / "dashboards" / f).read_text())["annotations"]["list"]
        assert any("calibration_runs" in json.dumps(a) for a in ann), f"{f}: no calibration_runs annotation"


def test_grafana_queries_name_what_influxdb_really_holds(stack):
    influx = stack.influx
    obs = stack.observer
    # A calibration run, so that calibration_runs exists (the panel test may have made one).
    if not influx.query('SHOW MEASUREMENTS WITH MEASUREMENT = "calibration_runs"'):
        obs.publish("ph2acf/cmd/run", json.dumps({
            "calibration": "pedenoise", "config": "PS_module",
            "modules": ["PS_26_05-IBA_00002"], "operator": "grafana_test"}))
    # A burn-in run with a step start and a pause, so that burnin_steps has both (the panel
    # test made one); then aborted: HV, then LV off.
    pause_points = """SELECT "reason" FROM "burnin_steps" WHERE "event" = 'pause'"""
    if not influx.query(pause_points):
        t0 = time.monotonic()
        refusals = []

        def start():
            # Refused until the interlock has settled to OK after the stack started.
            t = time.monotonic()
            obs.publish("burnin/cmd/start", json.dumps({
                "sequence": "short", "modules": ["module_0"], "operator": "grafana_test"}))
            r = obs.wait_json("burnin/reply", lambda r: r["topic"] == "burnin/cmd/start", WAIT, since=t,
                              log=stack.log)
            refusals.append(r.get("error"))
            return r["ok"]

        wait_until("burnin/cmd/start accepted", start, 90, interval=2,
                   log=lambda: f"refusals: {refusals[-3:]}\n{stack.log()}")
        obs.wait_json("burnin/status", lambda s: s["state"] == "running", WAIT, since=t0, log=stack.log)
        obs.publish("burnin/cmd/pause", json.dumps({"operator": "grafana_test", "reason": "grafana test"}))
        obs.wait_json("burnin/status", lambda s: s["state"] == "paused", WAIT, since=t0, log=stack.log)
        obs.publish("burnin/cmd/abort", json.dumps({"operator": "grafana_test", "reason": "grafana test"}))
    # Points reach InfluxDB through burnin's queue: wait for the pause itself.
    wait_until("a burnin_steps pause in InfluxDB", lambda: influx.query(pause_points), 90, interval=1,
               log=stack.log)
    wanted = {"channels", "dcs_status", "chiller", "sensors", "telemetry_stats", "calibration_runs", "marta",
              "burnin_steps"}

    def present():
        got = {row[0] for s in influx.query("SHOW MEASUREMENTS") for row in s.get("values", [])}
        return wanted <= got

    wait_until(f"measurements {sorted(wanted)} in InfluxDB", present, 90, interval=1, log=stack.log)
    keys: dict[str, set] = {}
    for s in influx.query("SHOW FIELD KEYS") + influx.query("SHOW TAG KEYS"):
        keys.setdefault(s["name"], set()).update(row[0] for row in s.get("values", []))
    problems = []
    queries = dashboard_queries()
    assert len(queries) >= 15, f"only {len(queries)} queries found in the dashboards"
    for file, q in queries:
        measurements = QUERY_FROM.findall(q)
        assert measurements, f"{file}: no quoted measurement in `{q}`"
        for m in measurements:
            if m not in keys:
                problems.append(f"{file}: measurement {m} not in InfluxDB (query `{q}`)")
                continue
            # Every other quoted identifier must be a field or tag of that measurement.
            for ident in QUOTED.findall(q):
                if ident not in measurements and ident not in keys[m] and ident != "time":
                    problems.append(f"{file}: {m} has no field or tag `{ident}` (query `{q}`)")
        # And the query runs, as Grafana would send it, and finds data.
        concrete = (q.replace("$timeFilter", "time > now() - 1h").replace("$__interval", "10s")
                    .replace("/^$module$/", "/.*/").replace("/^$sensor$/", "/.*/"))
        try:
            if not influx.query(concrete):
                problems.append(f"{file}: no data for `{concrete}`")
        except AssertionError as e:
            problems.append(f"{file}: {e}")
    assert not problems, "\n".join(problems)
