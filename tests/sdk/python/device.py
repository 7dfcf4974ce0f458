"""A device on the unmodified Azure IoT device SDK for Python (azure-iot-device): sends telemetry with properties,
receives cloud-to-device messages, and prints what happened as one JSON object on standard output.

The device connection string comes from the environment (DEVICE_CONNECTION_STRING), not the command line, so its
key is not visible to other users of the machine. The SDK connects to HostName on IoT Hub's fixed ports (8883, or
443 with --websockets); --proxy sends that through an HTTP CONNECT proxy, the SDK's own option for devices behind
one, which lets a test reach a hub listening elsewhere.
"""

import argparse
import json
import os
import queue
import sys
import time

from azure.iot.device import IoTHubDeviceClient, Message, ProxyOptions
from importlib.metadata import version


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ca", required=True, help="PEM file of the CA the hub's certificate chains to")
    parser.add_argument("--websockets", action="store_true", help="MQTT over WebSockets (port 443)")
    parser.add_argument("--send", type=int, default=3, help="telemetry messages to send")
    parser.add_argument("--receive", type=int, default=0, help="C2D messages to wait for")
    parser.add_argument("--ready-file", help="created once connected and subscribed to C2D messages")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for the C2D messages")
    parser.add_argument("--proxy", help="host:port of an HTTP CONNECT proxy")
    parser.add_argument("--tag", default="python", help="prefix of the message ids")
    return parser.parse_args()


def client_for(args):
    options = {"server_verification_cert": open(args.ca).read(), "websockets": args.websockets}
    if args.proxy:
        host, port = args.proxy.rsplit(":", 1)
        options["proxy_options"] = ProxyOptions("HTTP", host, int(port))
    return IoTHubDeviceClient.create_from_connection_string(os.environ["DEVICE_CONNECTION_STRING"], **options)


def main():
    args = parse_args()
    client = client_for(args)
    inbox = queue.Queue()
    # Setting the handler subscribes to devices/{id}/messages/devicebound/#; returning from it acknowledges.
    client.on_message_received = inbox.put
    client.connect()
    if args.ready_file:
        open(args.ready_file, "w").close()
    sent = []
    for i in range(args.send):
        message = Message(json.dumps({"n": i, "from": args.tag}), content_encoding="utf-8",
                          content_type="application/json")
        message.message_id = f"{args.tag}-{i}"
        message.correlation_id = f"corr-{i}"
        message.custom_properties["seq"] = str(i)
        message.custom_properties["sdk"] = args.tag
        client.send_message(message)
        sent.append(message.message_id)
    received = []
    deadline = time.monotonic() + args.timeout
    while len(received) < args.receive and time.monotonic() < deadline:
        try:
            message = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        received.append({
            "data": message.data.decode("utf-8", "replace"),
            "message_id": message.message_id,
            "correlation_id": message.correlation_id,
            "content_type": message.content_type,
            "custom_properties": message.custom_properties,
        })
    client.shutdown()
    print(json.dumps({"sdk": "azure-iot-device " + version("azure-iot-device"), "sent": sent,
                      "received": received}))
    return 0 if len(received) >= args.receive else 1


if __name__ == "__main__":
    sys.exit(main())
