// Node-RED settings of the Tracker DCS control panel.
//   npm ci --prefix deploy/node-red
//   DCS_MQTT_PASSWORD=... deploy/node-red/node_modules/.bin/node-red \
//       --settings deploy/node-red/settings.js --userDir deploy/node-red
// The panel is at http://127.0.0.1:1880/ui, the editor at http://127.0.0.1:1880/.
//
// Everything site-specific comes from the environment, never from the flows file:
//   DCS_MQTT_HOST (127.0.0.1), DCS_MQTT_PORT (1883), DCS_MQTT_USERNAME (dcs),
//   DCS_MQTT_PASSWORD (required unless the broker allows anonymous clients; `dcs up`
//   writes it to .dcs/mqtt-dcs.secret), NODE_RED_HOST (127.0.0.1), NODE_RED_PORT (1880),
//   NODE_RED_FLOW_FILE (flows.json in the user directory),
//   NODE_RED_ADMIN_PASSWORD_HASH (a bcrypt hash, `node-red admin hash-pw`: protects the
//   editor with user `admin`; without it the editor is open to whoever reaches the port).
const env = process.env;
env.DCS_MQTT_HOST = env.DCS_MQTT_HOST || "127.0.0.1";
env.DCS_MQTT_PORT = env.DCS_MQTT_PORT || "1883";
env.DCS_MQTT_USERNAME = env.DCS_MQTT_USERNAME || "dcs";
env.DCS_MQTT_PASSWORD = env.DCS_MQTT_PASSWORD || "";

const port = Number(env.NODE_RED_PORT || "1880");
if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new Error(`NODE_RED_PORT must be a TCP port (1-65535), got "${env.NODE_RED_PORT}"`);
}

module.exports = {
    uiHost: env.NODE_RED_HOST || "127.0.0.1",
    uiPort: port,
    // The lab pod reads the shipped flows from its ConfigMap (read-only: change the
    // panel in the repository, not in the pod's editor).
    flowFile: env.NODE_RED_FLOW_FILE || "flows.json",
    // flows_cred.json holds only ${VAR} references to the environment, so there is
    // nothing to encrypt; the real credentials never reach a file.
    credentialSecret: false,
    flowFilePretty: true,
    adminAuth: env.NODE_RED_ADMIN_PASSWORD_HASH ? {
        type: "credentials",
        users: [{ username: "admin", password: env.NODE_RED_ADMIN_PASSWORD_HASH, permissions: "*" }],
    } : undefined,
    // Labs have no internet: no update checks, no telemetry, no palette downloads.
    diagnostics: { enabled: false, ui: false },
    telemetry: { enabled: false, updateNotification: false },
    externalModules: { autoInstall: false, palette: { allowInstall: false } },
    editorTheme: {
        projects: { enabled: false },
        palette: { editable: false },
        tours: false,
    },
    logging: { console: { level: env.NODE_RED_LOG_LEVEL || "info", metrics: false, audit: false } },
    functionExternalModules: false,
    exportGlobalContextKeys: false,
};
