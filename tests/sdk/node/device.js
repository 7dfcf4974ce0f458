// A device on the unmodified Azure IoT device SDK for Node (azure-iot-device with azure-iot-device-mqtt): sends
// telemetry with properties, receives cloud-to-device messages, and prints what happened as one JSON object.
//
// The device connection string comes from the environment (DEVICE_CONNECTION_STRING), so its key is not on the
// command line. The SDK connects to HostName on IoT Hub's fixed ports (8883, or 443 for MqttWs); --port reaches a
// hub listening elsewhere through the SDK's own options: GatewayHostName (`host:port`, as for an IoT Edge gateway)
// for MQTT, and a WebSocket agent (the option meant for proxies) for MqttWs. The TLS name stays HostName.
'use strict';

const fs = require('fs');
const https = require('https');
const tls = require('tls');
const { Client, Message } = require('azure-iot-device');
const { Mqtt, MqttWs } = require('azure-iot-device-mqtt');

function parseArgs(argv) {
  const args = { send: 3, receive: 0, timeout: 30, transport: 'mqtt', tag: 'node' };
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, '');
    args[name] = ['send', 'receive', 'timeout', 'port'].includes(name) ? Number(argv[i + 1]) : argv[i + 1];
  }
  if (!args.ca) throw new Error('--ca FILE is required');
  return args;
}

// An agent that opens its TLS connections on `port`, whatever port the URL names.
class PortAgent extends https.Agent {
  constructor(port, ca) {
    super({ ca, keepAlive: false });
    this.port = port;
  }
  createConnection(options, callback) {
    return tls.connect({ ...options, port: this.port }, callback);
  }
}

function clientFor(args) {
  let connectionString = process.env.DEVICE_CONNECTION_STRING;
  const ca = fs.readFileSync(args.ca, 'utf8');
  const options = { ca };
  if (args.transport === 'ws') {
    if (args.port) options.mqtt = { webSocketAgent: new PortAgent(args.port, ca) };
    return { client: Client.fromConnectionString(connectionString, MqttWs), options };
  }
  if (args.port) {
    const host = /(?:^|;)HostName=([^;]+)/.exec(connectionString)[1];
    connectionString += `;GatewayHostName=${host}:${args.port}`;
  }
  return { client: Client.fromConnectionString(connectionString, Mqtt), options };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { client, options } = clientFor(args);
  await client.setOptions(options);
  const received = [];
  let gotAll;
  const allReceived = new Promise((resolve) => { gotAll = resolve; });
  client.on('message', (message) => {
    const properties = {};
    for (let i = 0; i < message.properties.count(); i++) {
      const item = message.properties.getItem(i);
      properties[item.key] = item.value;
    }
    received.push({
      data: message.data.toString('utf8'),
      message_id: message.messageId,
      correlation_id: message.correlationId,
      content_type: message.contentType,
      custom_properties: properties,
    });
    // Over MQTT the PUBACK is the completion; the SDK's complete() is a no-op there, called as an app would.
    client.complete(message, () => {});
    if (received.length >= args.receive) gotAll();
  });
  client.on('error', (err) => console.error('client error:', err.message));
  await client.open();
  if (args['ready-file']) fs.writeFileSync(args['ready-file'], '');
  const sent = [];
  for (let i = 0; i < args.send; i++) {
    const message = new Message(JSON.stringify({ n: i, from: args.tag }));
    message.messageId = `${args.tag}-${i}`;
    message.correlationId = `corr-${i}`;
    message.contentType = 'application/json';
    message.contentEncoding = 'utf-8';
    message.properties.add('seq', String(i));
    message.properties.add('sdk', args.tag);
    await client.sendEvent(message);
    sent.push(message.messageId);
  }
  if (args.receive > 0) {
    await Promise.race([allReceived, new Promise((resolve) => setTimeout(resolve, args.timeout * 1000))]);
  }
  await client.close();
  const versions = ['azure-iot-device', 'azure-iot-device-mqtt']
    .map((name) => `${name} ${require(`${name}/package.json`).version}`).join(', ');
  console.log(JSON.stringify({ sdk: versions, sent, received }));
  process.exit(received.length >= args.receive ? 0 : 1);
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(2);
});
