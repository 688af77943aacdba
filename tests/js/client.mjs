// A scripted MQTT.js client for tests/test_ws_mqttjs.py.
//
// Usage: node client.mjs '<json config>'
//   url          mqtt://, ws://, wss:// URL
//   options      passed to mqtt.connect (protocolVersion, username, password, clientId, ...)
//   ca           path of a PEM CA bundle to trust (wss://)
//   subscribe    [[filter, qos], ...]
//   publish      [{topic, payload, qos, retain, repeat}, ...]  sent after the subscriptions
//                (repeat: payload repeated that many times, for large messages)
//   echo         {from, to}: republish every message received on `from` to `to`
//   expect       stop once this many messages arrived and every publish is done
//   timeout_ms   give up after this long (exit 2)
// Every event is one JSON line on stdout; the Python side reads them.
import fs from "node:fs";
import mqtt from "mqtt";

const cfg = JSON.parse(process.argv[2]);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
// stdout into a pipe is asynchronous once the pipe is full (a 300 kB message
// line): exit only after everything written so far has been flushed.
const exit = (code) => process.stdout.write("", () => process.exit(code));
const options = { reconnectPeriod: 0, connectTimeout: 5000, ...(cfg.options || {}) };
if (cfg.ca) {
  options.ca = fs.readFileSync(cfg.ca);
  options.rejectUnauthorized = true;
}
const timer = setTimeout(() => {
  out({ event: "timeout" });
  exit(2);
}, cfg.timeout_ms || 10000);

const client = mqtt.connect(cfg.url, options);
let received = 0;
const expect = cfg.expect || 0;

let published = false; // all of cfg.publish acknowledged (or refused)
let ending = false;
function maybeFinish() {
  if (published && received >= expect) finish();
}

function finish() {
  if (ending) return;
  ending = true;
  client.end(false, {}, () => {
    out({ event: "done" });
    clearTimeout(timer);
    exit(0);
  });
}

client.on("error", (err) => {
  out({ event: "error", code: err.code ?? null, message: String(err.message) });
  clearTimeout(timer);
  client.end(true);
  exit(1);
});

let connected = false;
client.on("close", () => {
  // A refused WebSocket upgrade (wrong path, bad certificate) ends here
  // without an "error" event; report it instead of waiting for the timeout.
  if (!connected) {
    out({ event: "error", code: null, message: "closed before CONNACK" });
    clearTimeout(timer);
    exit(1);
  }
});

client.on("message", (topic, payload, packet) => {
  received += 1;
  out({ event: "message", topic, payload: payload.toString("utf8"), qos: packet.qos,
        retain: packet.retain });
  if (cfg.echo && topic === cfg.echo.from) {
    client.publish(cfg.echo.to, payload, { qos: 1 }, (err) => {
      out({ event: "echoed", topic: cfg.echo.to, error: err ? String(err.message) : null });
      maybeFinish();
    });
  } else {
    maybeFinish();
  }
});

client.on("connect", async (connack) => {
  connected = true;
  out({ event: "connect", reasonCode: connack.reasonCode ?? connack.returnCode ?? 0,
        protocol: options.protocolVersion || 4 });
  try {
    for (const [filter, qos] of cfg.subscribe || []) {
      try {
        const granted = await client.subscribeAsync(filter, { qos });
        out({ event: "suback", filter, granted: granted.map((g) => g.qos) });
      } catch (err) {
        // MQTT.js rejects a SUBACK failure code (v5 0x87, 3.1.1 0x80).
        out({ event: "suback", filter, error: String(err.message) });
      }
    }
    out({ event: "ready" });
    for (const p of cfg.publish || []) {
      const payload = p.repeat ? p.payload.repeat(p.repeat) : p.payload;
      try {
        const ack = await client.publishAsync(p.topic, payload, { qos: p.qos || 0, retain: !!p.retain });
        out({ event: "published", topic: p.topic,
              reasonCode: ack && ack.reasonCode !== undefined ? ack.reasonCode : null });
      } catch (err) {
        // v5 PUBACK with a failure reason code (e.g. 0x87) rejects the promise.
        out({ event: "published", topic: p.topic, error: String(err.message), code: err.code ?? null });
      }
    }
    published = true;
    maybeFinish();
  } catch (err) {
    out({ event: "error", code: err.code ?? null, message: String(err.message) });
    exit(1);
  }
});
