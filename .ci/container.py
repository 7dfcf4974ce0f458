#!/usr/bin/env python3
"""The checks of .ci/container that need more than shell: the image's metadata, its entry point run by chroot, the
walk a user makes through the hub it serves, the graceful stop, and compose.yaml's shape.

  container.py inspect IMAGE.json                      what the image declares (user, ports, volumes, health check…)
  container.py walk IMAGE.json MOUNT DATABASE_URL PSQL  two hubs from the image, a device, D2C, C2D, SIGTERM
  container.py compose compose.yaml                    the services, ports, volumes and profiles the README names

Only the standard library, plus PyYAML for `compose`.
"""

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

API = "api-version=2021-04-12"
DEVICE = "ci-thermostat"


def fail(message):
    print(f"container: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


# ---------------------------------------------------------------------------------------------------------------
# The image's metadata


def image_config(path):
    """`podman image inspect` output: the config an engine would run the image with."""
    (image,) = json.load(open(path))
    return image


def inspect(path):
    image = image_config(path)
    config = image["Config"]
    user = config.get("User", "")
    uid = user.split(":")[0]
    check(uid and uid not in ("0", "root"), f"the image runs as root (USER {user!r})")
    check(uid.isdigit(), f"USER {user!r} is not numeric: orchestrators cannot verify it is not root")
    ports = set(config.get("ExposedPorts") or {})
    for port in ("8080/tcp", "8443/tcp", "8883/tcp"):
        check(port in ports, f"{port} is not exposed (exposed: {sorted(ports)})")
    volumes = set(config.get("Volumes") or {})
    for volume in ("/var/lib/iothub/data", "/etc/iothub/tls"):
        check(volume in volumes, f"{volume} is not a volume (volumes: {sorted(volumes)})")
    check(config.get("StopSignal") == "SIGTERM", f"STOPSIGNAL is {config.get('StopSignal')!r}")
    test = healthcheck(image)
    check(test[:1] == ["CMD"] and "health" in test, f"HEALTHCHECK {test} does not run `iothub health`")
    env = environment(image)
    check(env.get("IOTHUB_LISTEN", "").startswith("0.0.0.0:"), "the hub does not listen on the container's interfaces")
    check(env.get("IOTHUB_DATA_DIR") == "/var/lib/iothub/data", "IOTHUB_DATA_DIR is not the data volume")
    check(env.get("IOTHUB_MQTTS_LISTEN", "").startswith("0.0.0.0:"),
          "MQTT over TLS does not listen on the container's interfaces")
    for name in ("IOTHUB_TLS_CERT", "IOTHUB_TLS_KEY"):
        # A hub told of certificate files it does not have cannot start; without them it uses its local CA.
        check(name not in env, f"the image sets {name}: a hub with an empty TLS volume would not start")
    print(f"container: image user {user}, ports {sorted(ports)}, volumes {sorted(volumes)}, "
          f"stop signal {config['StopSignal']}, health check {test[1:]}")


def healthcheck(image):
    # Podman reports it at the top level; an engine's inspect puts it in Config.
    check_config = image.get("Healthcheck") or image["Config"].get("Healthcheck") or {}
    return check_config.get("Test") or []


def environment(image):
    return dict(entry.split("=", 1) for entry in image["Config"].get("Env") or [])


# ---------------------------------------------------------------------------------------------------------------
# Running the image without an engine: chroot into its files as its USER, in its WORKDIR, with its ENV.


class Image:
    def __init__(self, config_path, mount):
        self.image = image_config(config_path)
        self.config = self.image["Config"]
        self.mount = mount
        uid, _, gid = self.config["User"].partition(":")
        self.uid, self.gid = int(uid), int(gid or uid)

    def command(self, argv, env, entrypoint=True):
        """A Popen argument list that runs `argv` in the image: after the entry point like `docker run IMAGE argv`
        (the image's CMD when argv is empty), or as is like `docker exec`."""
        if entrypoint:
            argv = (self.config.get("Entrypoint") or []) + (argv or self.config.get("Cmd") or [])
        spec = {
            "mount": self.mount,
            "workdir": self.config.get("WorkingDir") or "/",
            "uid": self.uid,
            "gid": self.gid,
            # An engine's default PATH when the image sets none.
            "env": {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    **environment(self.image), **env},
            "argv": argv,
        }
        return [sys.executable, __file__, "exec", json.dumps(spec)]

    def run(self, argv, env, entrypoint=True):
        return subprocess.run(self.command(argv, env, entrypoint), capture_output=True, text=True, timeout=60)


def exec_in_image(spec_json):
    """Replace this process with the command, inside the image's root, as its user."""
    spec = json.loads(spec_json)
    os.chroot(spec["mount"])
    os.chdir(spec["workdir"])
    os.setgroups([])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    os.execvpe(spec["argv"][0], spec["argv"], spec["env"])


# ---------------------------------------------------------------------------------------------------------------
# HTTP


def request(method, url, token=None, headers=None, body=None, timeout=30, context=None):
    """(status, headers, body bytes). http.client sends header names as written (urllib capitalizes them), in
    lower case like the device SDKs."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    request_headers = dict(headers or {})
    if token:
        request_headers["authorization"] = token
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, path, body=body.encode() if isinstance(body, str) else body,
                           headers=request_headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hub:
    """One `iothub serve` from the image, its log in a file."""

    def __init__(self, image, name, env, log_dir):
        self.image, self.name, self.env = image, name, env
        self.port = int(env["IOTHUB_LISTEN"].rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(image.command([], env), stdout=self.log, stderr=subprocess.STDOUT)

    def log_text(self):
        with open(self.log_path) as f:
            return f.read()

    def healthcheck(self):
        """The image's HEALTHCHECK command, run as an engine would: in the image, with the container's env."""
        test = healthcheck(self.image.image)
        return self.image.run(test[1:], self.env, entrypoint=False)

    def wait_healthy(self, deadline=90):
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.process.poll() is not None:
                fail(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()}")
            result = self.healthcheck()
            if result.returncode == 0:
                return
            time.sleep(0.2)
        fail(f"{self.name}: the health check did not pass within {deadline} s:\n{self.log_text()}")

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def walk(config_path, mount, database_url, psql, work):
    image = Image(config_path, mount)
    tls_port = free_port()
    base = {"DATABASE_URL": database_url, "IOTHUB_HOSTNAME": "localhost",
            # Request starts are logged at debug: the graceful-stop check waits for its long poll to reach the hub.
            "RUST_LOG": "info,sqlx=warn,tower_http=debug"}
    # No network namespace here: the hubs share the machine's, so each gets a free loopback port instead of 8080.
    # hub-1 presents the TLS volume's certificate; hub-2 the local CA's, made in the data volume.
    one = Hub(image, "hub-1", {**base, "IOTHUB_LISTEN": f"127.0.0.1:{free_port()}",
                               "IOTHUB_MQTTS_LISTEN": f"127.0.0.1:{free_port()}",
                               "IOTHUB_TLS_LISTEN": f"127.0.0.1:{tls_port}",
                               "IOTHUB_TLS_CERT": "/etc/iothub/tls/server.pem",
                               "IOTHUB_TLS_KEY": "/etc/iothub/tls/server.key"}, work)
    two = Hub(image, "hub-2", {**base, "IOTHUB_LISTEN": f"127.0.0.1:{free_port()}",
                               "IOTHUB_MQTTS_LISTEN": f"127.0.0.1:{free_port()}"}, work)
    try:
        walk_hubs(image, one, two, tls_port, psql, work)
    finally:
        one.stop()
        two.stop()


def walk_hubs(image, one, two, tls_port, psql, work):
    one.wait_healthy()
    two.wait_healthy()
    print(f"container: two hubs from the image are healthy (HEALTHCHECK {healthcheck(image.image)[1:]})")
    uid = int(re.search(r"^Uid:\s+(\d+)", open(f"/proc/{one.process.pid}/status").read(), re.M).group(1))
    check(uid == image.uid, f"the hub runs as uid {uid}, not the image's USER {image.uid}")
    for path in ("/health/live", "/health/ready"):
        status, _, body = request("GET", one.url + path)
        check(status == 200 and body == b"ok", f"{path}: {status} {body!r}")

    # The migrations are in the binary: the image holds no SQL file, and the empty database got every migration.
    sql_files = [f for root, _, files in os.walk(image.mount) for f in files if f.endswith(".sql")]
    check(not sql_files, f"the image holds SQL files: {sql_files[:5]}")
    applied = subprocess.run(psql + ["-Atc", "SELECT count(*) FROM _sqlx_migrations WHERE success"],
                             capture_output=True, text=True, check=True).stdout.strip()
    expected = len([f for f in os.listdir("migrations") if f.endswith(".sql")])
    check(applied == str(expected), f"{applied} migrations applied, the repository has {expected}")
    print(f"container: the binary migrated the empty database ({applied} migrations, no SQL file in the image)")

    # The CLI inside the image, as `docker compose exec iothub iothub …` runs it.
    cli_env = {**one.env, "IOTHUB_URL": one.url}
    created = image.run(["device", "create", DEVICE], cli_env)
    check(created.returncode == 0, f"iothub device create: {created.stderr}")
    device = json.loads(created.stdout)
    check(device["deviceId"] == DEVICE and device["status"] == "enabled", f"created: {device}")
    check(f"HostName=localhost;DeviceId={DEVICE};SharedAccessKey=" in created.stderr,
          f"no device connection string: {created.stderr}")
    policies = image.run(["policy", "list"], cli_env)
    check(policies.returncode == 0 and "SharedAccessKeyName=iothubowner" in policies.stdout,
          f"iothub policy list: {policies.stdout} {policies.stderr}")
    device_token = cli_token(image, cli_env, "--device", DEVICE)
    service_token = cli_token(image, cli_env, "--policy", "service")
    print(f"container: the CLI in the image created {DEVICE} and printed connection strings and tokens")

    d2c(one, two, device_token, service_token)
    c2d(one, two, device_token, service_token)
    https(one, tls_port, work)
    local_ca(image, two, work)
    graceful_stop(one, device_token)
    for hub in (two,):
        hub.process.send_signal(signal.SIGTERM)
        check(hub.process.wait(timeout=60) == 0, f"{hub.name} exited with {hub.process.returncode}")


def cli_token(image, env, *args):
    result = image.run(["token", *args], env)
    check(result.returncode == 0 and result.stdout.startswith("SharedAccessSignature "),
          f"iothub token {' '.join(args)}: {result.stderr}")
    return result.stdout.strip()


def d2c(one, two, device_token, service_token):
    """A device sends through one hub; the service reads it back through the other."""
    marker = f"container-ci-{os.getpid()}"
    status, _, body = request("POST", f"{one.url}/devices/{DEVICE}/messages/events?{API}", device_token,
                              {"content-type": "application/json", "iothub-contenttype": "application/json",
                               "iothub-app-run": marker},
                              json.dumps({"temperature": 21.5}))
    check(status == 204, f"D2C send: {status} {body!r}")
    status, _, body = request("GET", f"{two.url}/messages/events?{API}", service_token)
    check(status == 200, f"GET /messages/events: {status} {body!r}")
    found = []
    for partition in json.loads(body)["partitions"]:
        if partition.get("lastSequenceNumber") is None:
            continue
        url = f"{two.url}/messages/events/partitions/{partition['partitionId']}?{API}&from=start&max-count=100"
        status, _, body = request("GET", url, service_token)
        check(status == 200, f"partition read: {status} {body!r}")
        found += [e for e in json.loads(body)["events"] if e["deviceId"] == DEVICE]
    check(len(found) == 1, f"the event sent was read {len(found)} times: {found}")
    check(found[0]["properties"].get("run") == marker, f"event properties: {found[0]}")
    check(found[0].get("bodyJson") == {"temperature": 21.5}, f"event body: {found[0]}")
    print("container: D2C: sent through hub-1 (204), read once through hub-2 with its body and property")


def c2d(one, two, device_token, service_token):
    """Enqueued through one hub, received and completed through the other; the sender's feedback arrives."""
    message_id = f"ci-order-{os.getpid()}"
    status, _, body = request("POST", f"{one.url}/devices/{DEVICE}/commands?{API}", service_token,
                              {"content-type": "application/json", "iothub-messageid": message_id,
                               "iothub-ack": "full"}, '{"setpoint":21}')
    check(status == 201, f"C2D enqueue: {status} {body!r}")
    sequence = json.loads(body)["sequenceNumber"]
    status, headers, body = request("GET", f"{two.url}/devices/{DEVICE}/messages/deviceBound?{API}&wait-ms=10000",
                                    device_token)
    check(status == 200 and body == b'{"setpoint":21}', f"C2D receive: {status} {body!r}")
    check(headers.get("iothub-messageid") == message_id, f"received {headers.get('iothub-messageid')}")
    lock = headers["ETag"].strip('"')
    status, _, body = request("DELETE", f"{two.url}/devices/{DEVICE}/messages/deviceBound/{lock}?{API}",
                              device_token)
    check(status == 204, f"C2D complete: {status} {body!r}")
    status, _, body = request("GET", f"{one.url}/devices/{DEVICE}/commands/{sequence}?{API}", service_token)
    outcome = json.loads(body)
    check(status == 200 and outcome["outcome"] == "Success", f"C2D status: {status} {outcome}")
    status, headers, body = request("GET", f"{one.url}/messages/serviceBound/feedback?{API}&wait-ms=10000",
                                    service_token)
    check(status == 200, f"feedback receive: {status} {body!r}")
    records = [r for r in json.loads(body) if r["originalMessageId"] == message_id]
    check([r["statusCode"] for r in records] == ["Success"], f"feedback records: {records}")
    lock = headers["ETag"].strip('"')
    status, _, body = request("DELETE", f"{one.url}/messages/serviceBound/feedback/{lock}?{API}", service_token)
    check(status == 204, f"feedback complete: {status} {body!r}")
    print("container: C2D: enqueued on hub-1, received and completed on hub-2, Success feedback on hub-1")


def local_ca(image, two, work):
    """Without certificate files the hub made its local CA in the data volume, and `iothub ca` prints it."""
    printed = image.run(["ca"], two.env)
    check(printed.returncode == 0, f"iothub ca: {printed.stderr}")
    with open(os.path.join(work, "data", "tls", "ca.pem")) as f:
        check(printed.stdout == f.read(), "iothub ca does not print the data volume's tls/ca.pem")
    mode = os.stat(os.path.join(work, "data", "tls", "ca.key")).st_mode & 0o777
    check(mode == 0o600, f"the CA's key has mode {mode:o}")
    print("container: the local CA is in the data volume, and `iothub ca` in the image prints it")


def https(one, tls_port, work):
    """The certificate and key from the TLS volume serve HTTPS."""
    context = ssl.create_default_context(cafile=os.path.join(work, "tls", "server.pem"))
    status, _, body = request("GET", f"https://127.0.0.1:{tls_port}/health/ready", context=context)
    check(status == 200 and body == b"ok", f"HTTPS /health/ready: {status} {body!r}")
    print("container: HTTPS with the certificate from the TLS volume answers")


def graceful_stop(hub, device_token):
    """SIGTERM while a long poll is in flight: it is answered, and the process exits 0."""
    answer = {}

    def long_poll():
        try:
            answer["status"] = request("GET", f"{hub.url}/devices/{DEVICE}/messages/deviceBound?{API}&wait-ms=25000",
                                       device_token, timeout=60)[0]
        except Exception as error:  # a reset or a timeout is what the check is about
            answer["error"] = repr(error)

    started = hub.log_text().count("started processing request")
    poller = threading.Thread(target=long_poll)
    poller.start()
    end = time.monotonic() + 30
    while hub.log_text().count("started processing request") == started:
        check(time.monotonic() < end, "the long poll never reached the hub")
        time.sleep(0.05)
    hub.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    try:
        code = hub.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        fail(f"{hub.name} still runs 60 s after SIGTERM")
    poller.join(timeout=60)
    check("error" not in answer, f"the in-flight long poll was not answered: {answer.get('error')}")
    check(answer.get("status") == 204, f"the in-flight long poll got {answer.get('status')}")
    check(code == 0, f"{hub.name} exited with {code} after SIGTERM:\n{hub.log_text()}")
    check("shutting down" in hub.log_text(), "the hub did not log its shutdown")
    after = hub.healthcheck()
    check(after.returncode == 1, f"the health check passes against a stopped hub: {after.stdout} {after.stderr}")
    print(f"container: SIGTERM: the in-flight long poll was answered (204), the hub exited 0 after "
          f"{time.monotonic() - signalled:.1f} s, and the health check now fails")


# ---------------------------------------------------------------------------------------------------------------
# compose.yaml


def compose(path):
    import yaml

    spec = yaml.safe_load(open(path))
    services = spec["services"]
    check({"postgres", "iothub", "iothub-2"} <= set(services), f"services: {sorted(services)}")
    hub, replica, db = services["iothub"], services["iothub-2"], services["postgres"]
    check(hub.get("build") == ".", "the iothub service does not build the repository's Dockerfile")
    check(hub["image"] == replica["image"], "the replica runs another image")
    check("profiles" not in hub and "profiles" not in db, "the hub and PostgreSQL must start without a profile")
    check(replica.get("profiles") == ["replicas"], f"the replica's profiles: {replica.get('profiles')}")
    for service in (hub, replica):
        url = service["environment"]["DATABASE_URL"]
        check(urllib.parse.urlsplit(url).hostname == "postgres", f"DATABASE_URL {url} is not the postgres service")
        check(service["depends_on"]["postgres"]["condition"] == "service_healthy", "starts before PostgreSQL")
    hub_ports = {p.split(":")[-1]: p.split(":")[0] for p in hub["ports"]}
    replica_ports = {p.split(":")[-1]: p.split(":")[0] for p in replica["ports"]}
    check(set(hub_ports) >= {"8080", "8443", "8883"}, f"the hub's ports: {hub['ports']}")
    check(not set(hub_ports.values()) & set(replica_ports.values()), "the replica publishes the hub's ports")
    volumes = spec.get("volumes") or {}
    for service in (hub, replica):
        data = [v for v in service["volumes"] if v.endswith(":/var/lib/iothub/data")]
        check(len(data) == 1 and data[0].split(":")[0] in volumes, f"no named data volume: {service['volumes']}")
    check(hub["volumes"][0] != replica["volumes"][0], "the hubs share a data folder")
    check(any(v.endswith(":/var/lib/postgresql/data") for v in db["volumes"]), "PostgreSQL keeps no volume")
    print(f"container: compose.yaml: services {sorted(services)}, hub ports {hub['ports']}, "
          f"replica ports {replica['ports']} (profile replicas), volumes {sorted(volumes)}")


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "exec":
        exec_in_image(*args)
    elif command == "inspect":
        inspect(*args)
    elif command == "walk":
        config_path, mount, database_url, psql, work = args
        walk(config_path, mount, database_url, json.loads(psql), work)
    elif command == "compose":
        compose(*args)
    else:
        fail(f"unknown command {command}")


if __name__ == "__main__":
    main()
