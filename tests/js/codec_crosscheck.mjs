// Cross-check helper for tests/test_codec_mqttpacket.py: runs mqtt-packet (the
// packet codec under MQTT.js and aedes) on requests read from stdin, one JSON
// object per line, and writes one JSON answer per line.
//   {"op": "generate", "version": 5, "packet": {...}}  -> {"hex": "..."} | {"error": "..."}
//   {"op": "parse", "version": 5, "hex": "..."}        -> {"packets": [...]} | {"error": "..."}
// Binary fields travel as {"hex": "..."} in both directions, because JSON has no bytes.
import mqttPacket from "mqtt-packet";
import { readFileSync } from "node:fs";

function toWire(value) {
  if (Array.isArray(value)) return value.map(toWire);
  if (value && typeof value === "object") {
    if (Object.keys(value).length === 1 && typeof value.hex === "string") {
      return Buffer.from(value.hex, "hex");
    }
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = toWire(v);
    return out;
  }
  return value;
}

function fromWire(value) {
  if (Buffer.isBuffer(value)) return { hex: value.toString("hex") };
  if (Array.isArray(value)) return value.map(fromWire);
  if (value && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = fromWire(v);
    return out;
  }
  return value;
}

function handle(request) {
  if (request.op === "generate") {
    const buf = mqttPacket.generate(toWire(request.packet), { protocolVersion: request.version });
    return { hex: buf.toString("hex") };
  }
  const parser = mqttPacket.parser({ protocolVersion: request.version });
  const packets = [];
  let error = null;
  parser.on("packet", (p) => packets.push(fromWire(p)));
  parser.on("error", (e) => { error = e.message; });
  parser.parse(Buffer.from(request.hex, "hex"));
  return error ? { error, packets } : { packets };
}

for (const line of readFileSync(0, "utf8").split("\n")) {
  if (!line.trim()) continue;
  let answer;
  try {
    answer = handle(JSON.parse(line));
  } catch (e) {
    answer = { error: String(e && e.message ? e.message : e) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
