"""Runs the real tron binaries (release builds in target/release, or $TRON_BIN_DIR) with
generated configs, and reads back what they produced. Shared by the end-to-end suites and by
scripts/run-local.sh."""
import csv
import gzip
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "services"))
import servers  # noqa: E402

BIN = os.environ.get("TRON_BIN_DIR", os.path.join(ROOT, "target", "release"))


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join("%s = %s" % (json.dumps(k), toml_value(x)) for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(doc, prefix=""):
    """Enough TOML for our configs: scalars, arrays, tables and arrays of tables."""
    lines, tables = [], []
    for k, v in doc.items():
        if isinstance(v, dict) and not k.startswith("="):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        else:
            lines.append("%s = %s" % (json.dumps(k) if "." in k else k, toml_value(v)))
    out = "\n".join(lines) + "\n"
    for k, v in tables:
        name = prefix + k
        if isinstance(v, list):
            for item in v:
                out += "\n[[%s]]\n" % name + to_toml(item, name + ".")
        else:
            out += "\n[%s]\n" % name + to_toml(v, name + ".")
    return out


def metrics_port():
    return servers.free_port()


class Proc:
    """One tron process with its config file and log."""

    def __init__(self, name, binary, config, workdir, env=None, wrapper=(), args=()):
        self.name = name
        self.wrapper = list(wrapper)
        self.args = list(args)
        self.binary = os.path.join(BIN, binary)
        self.config_path = os.path.join(workdir, name + ".toml")
        self.log = os.path.join(workdir, name + ".log")
        self.config = config
        self.env = dict(os.environ, RUST_LOG=os.environ.get("TRON_LOG", "info"), **(env or {}))
        self.proc = None
        with open(self.config_path, "w") as f:
            f.write(to_toml(config))

    def start(self):
        self.proc = subprocess.Popen(self.wrapper + [self.binary, "--config", self.config_path] + self.args, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        port = int(self.config["metrics_listen"].rsplit(":", 1)[1])
        servers.wait_for(self.name, lambda: servers.http_ok("http://127.0.0.1:%d/metrics" % port),
                         timeout=60, proc=self.proc, log=self.log)
        return self

    def metrics(self):
        port = int(self.config["metrics_listen"].rsplit(":", 1)[1])
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
            return r.read().decode()

    def metric(self, name, **labels):
        return metric(self.metrics(), name, **labels)

    def peak_rss_mib(self):
        return peak_rss_mib(self.proc.pid)

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)

    def health(self):
        port = int(self.config["metrics_listen"].rsplit(":", 1)[1])
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=5) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=60):
        """SIGTERM and wait: returns the exit code (a clean drain exits 0)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, n=4000):
        try:
            return open(self.log, errors="replace").read()[-n:]
        except OSError:
            return ""


def peak_rss_mib(pid):
    """Peak resident memory (VmHWM) of a running process, from /proc."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_seconds(pid):
    """User + system CPU time a running process has used, from /proc."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text, name, **labels):
    """Sum of a metric's samples whose labels include `labels` (None when it has none)."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+|NaN)$", line)
        if not m or m.group(1) != name:
            continue
        if all('%s="%s"' % kv in (m.group(2) or "") for kv in labels.items()):
            total += float(m.group(3))
            found = True
    return total if found else None


def allow_open_files(n):
    """Raises our soft descriptor limit to at least `n` (up to the hard limit); the tron processes
    we start inherit it, and the agent holds one descriptor per followed file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n), hard))


def relay_config(workdir, certs, brokers, topic="logs", plaintext=False, shared_key=None, **extra):
    cfg = {
        "listen": "127.0.0.1:%d" % servers.free_port(),
        "metrics_listen": "127.0.0.1:%d" % servers.free_port(),
        "hostname": "relay-test",
        "dead_letter": {"path": os.path.join(workdir, "dead-letter.ndjson")},
        "kafka": {"brokers": brokers, "default_topic": topic, "linger": "5ms", "compression": "lz4",
                  "delivery_timeout": "30s"},
    }
    if plaintext:
        cfg["plaintext"] = True
    else:
        cfg["tls"] = {"cert": certs["server_cert"], "key": certs["server_key"]}
    if shared_key:
        cfg["security"] = {"shared_key": shared_key}
    cfg.update(extra)
    return cfg


def agent_config(workdir, log_glob, s3_url, relay_address, certs, s3_endpoint=None, shared_key=None, **extra):
    cfg = {
        "state_dir": os.path.join(workdir, "agent-state"),
        "host": "app-1",
        "metrics_listen": "127.0.0.1:%d" % servers.free_port(),
        "sources": [{"name": "app", "include": [log_glob], "tag": "app.log", "parser": "json",
                     "time_field": "time", "time_format": "rfc3339"}],
        "files": {"scan_interval": "500ms", "rotate_wait": "2s", "checkpoint_interval": "500ms"},
        "destinations": {
            "s3": {"url": s3_url, "batch": {"max_bytes": 4 << 20, "max_age": "1s", "max_inflight": 4,
                                              "max_buffer_bytes": 64 << 20}},
            "relay": {"addresses": [relay_address], "tls_ca": certs["ca"], "tls_server_name": "localhost",
                      "ack_timeout": "20s",
                      "batch": {"max_bytes": 512 << 10, "max_age": "0ms", "max_inflight": 8,
                                "max_buffer_bytes": 32 << 20}},
        },
    }
    if relay_address is None:  # an S3-only agent
        del cfg["destinations"]["relay"]
    if s3_endpoint:
        cfg["destinations"]["s3"]["endpoint"] = s3_endpoint
        cfg["destinations"]["s3"]["region"] = "us-east-1"
    if shared_key:
        cfg["destinations"]["relay"]["shared_key"] = shared_key
    cfg.update(extra)
    return cfg


def sink_config(workdir, brokers, url, gcs_endpoint=None, topic="logs", group="tron-sink", name="sink", **extra):
    cfg = {
        "metrics_listen": "127.0.0.1:%d" % servers.free_port(),
        "staging_dir": os.path.join(workdir, name + "-staging"),
        "kafka": {"brokers": brokers, "group_id": group, "topics": [topic]},
        "output": {"url": url, "format": "csv", "columns": [
            {"name": "time", "source": "@time", "type": "TIMESTAMP"},
            {"name": "tag", "source": "@tag", "type": "STRING"},
            {"name": "id", "source": "_id", "type": "STRING"},
            {"name": "seq", "source": "seq", "type": "INTEGER"},
            {"name": "msg", "source": "msg", "type": "STRING"},
        ]},
        "roll": {"max_records": 200000, "max_age": "3s", "idle_after": "2s"},
        "finalize": {"lateness": "5s", "interval": "1s"},
    }
    if gcs_endpoint:
        cfg["output"]["endpoint"] = gcs_endpoint
        cfg["output"]["anonymous"] = True
    cfg.update(extra)
    return cfg


def start_sink(procs, services, work, url, topic, columns, shipped_timing=False):
    """A sink on one topic (its own group) writing `columns` to `url` in fake-gcs-server, started
    and registered in `procs`. `shipped_timing`: the shipped roll and finalize settings instead
    of the tests' short ones."""
    cfg = sink_config(work, services.kafka_brokers, url, gcs_endpoint=services.gcs_endpoint, topic=topic, group=topic)
    if shipped_timing:
        del cfg["roll"], cfg["finalize"]
    cfg["output"]["columns"] = columns
    sink = Proc("sink", "tron-sink-secor", cfg, work)
    procs.append(sink)
    sink.start()
    return sink


def audit(sink, *args, env=None):
    """Runs `tron-sink-secor audit` with the sink's config: (exit code, stdout, stderr)."""
    r = subprocess.run([os.path.join(BIN, "tron-sink-secor"), "--config", sink.config_path, "audit"] + list(args),
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})))
    return r.returncode, r.stdout, r.stderr


def read_gz_lines(data):
    return gzip.decompress(data).decode("utf-8").splitlines()


def gcs_csv_rows_by_object(services, bucket, prefix):
    """(object name, CSV row) for every row of every data object (not `_SUCCESS` or
    `_manifest.json`) under `prefix`."""
    for obj in services.gcs_list(bucket, prefix):
        if not obj["name"].rsplit("/", 1)[1].startswith("_"):
            text = read_gz_lines(services.gcs_get(bucket, obj["name"]))
            for row in csv.reader(io.StringIO("\n".join(text) + "\n")):
                yield obj["name"], row


def gcs_csv_rows(services, bucket, prefix):
    """Every CSV row of every data object under `prefix`."""
    return [row for _, row in gcs_csv_rows_by_object(services, bucket, prefix)]


def s3_lines_by_object(services, bucket, prefix=""):
    """(key, line) for every line of every gzip object in an S3 bucket (the agent's archive)."""
    s3 = services.s3_client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            for text in read_gz_lines(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()):
                yield obj["Key"], text


def s3_seqs(services, bucket):
    """The `seq` field of every archived JSON line."""
    return {json.loads(text)["seq"] for _, text in s3_lines_by_object(services, bucket)}


def wait_until(what, check, timeout, interval=1.0, on_timeout=None):
    deadline = time.time() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.time() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise AssertionError("timed out after %ds waiting for %s\n%s" % (timeout, what, detail))
        time.sleep(interval)


def relay_to_gcs(services, certs, work, procs, topic, bucket, partitions, columns=None, **relay_options):
    """Creates `topic` and `bucket`, starts a relay routing to the topic and a sink (group = topic)
    writing to gs://bucket/w; returns (relay, sink, host, port) with both registered in `procs`."""
    os.makedirs(work)
    services.create_topic(topic, partitions)
    services.create_gcs_bucket(bucket)
    relay = Proc("relay", "tron-relay", relay_config(work, certs, services.kafka_brokers, topic=topic,
                                                     **relay_options), work)
    sink_cfg = sink_config(work, services.kafka_brokers, "gs://%s/w" % bucket, gcs_endpoint=services.gcs_endpoint,
                           topic=topic, group=topic)
    if columns:
        sink_cfg["output"]["columns"] = columns
    sink = Proc("sink", "tron-sink-secor", sink_cfg, work)
    procs.extend([relay, sink])
    relay.start(), sink.start()
    host, port = relay.config["listen"].rsplit(":", 1)
    return relay, sink, host, int(port)


class Gate:
    """A TCP forwarder in front of a server, so a test can make the server unreachable (refused
    connections, dropped sockets) and reachable again without losing the server's state, which an
    in-memory server such as moto would lose on a restart."""

    def __init__(self, target_port):
        import socket
        import threading
        self.socket, self.threading = socket, threading
        self.target = ("127.0.0.1", target_port)
        self.port = servers.free_port()
        self.conns, self.listener, self.lock = [], None, threading.Lock()

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.port

    def open(self):
        s = self.socket.socket()
        s.setsockopt(self.socket.SOL_SOCKET, self.socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        self.threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return self

    def close(self):
        # shutdown() first: on Linux close() alone does not wake the thread blocked in accept(),
        # which keeps the socket listening and lets one more connection through the "closed" gate.
        try:
            self.listener.shutdown(self.socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(self.socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self.socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns.extend([client, upstream])
            for a, b in ((client, upstream), (upstream, client)):
                self.threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def watermark_messages(brokers, topic, quiet=3.0, limit=None):
    """(partition, offset, value) of every relay watermark message in `topic` (header
    `tron_watermarks`). Reads the topic from the start until nothing arrives for `quiet` seconds
    (Tansu's reported end offset is not the true end), or for at most `limit` seconds while a
    relay is still writing them."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "watermark-reader-%d" % servers.free_port(),
                         "enable.auto.commit": False})
    # Assigned, not subscribed: no group join to wait for before the first message.
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found, last = [], time.time()
    deadline = time.time() + limit if limit else float("inf")
    try:
        while time.time() - last < quiet and time.time() < deadline:
            m = consumer.poll(0.5)
            if m is None or m.error():
                continue
            last = time.time()
            if any(k == "tron_watermarks" for k, _ in (m.headers() or [])):
                found.append((m.partition(), m.offset(), json.loads(m.value())))
    finally:
        consumer.close()
    return found


def watermark_offsets(brokers, topic, quiet=3.0):
    """(partition, offset) of every relay watermark message in `topic`: offsets that are not
    records, so no object holds them."""
    return {(p, o) for p, o, _ in watermark_messages(brokers, topic, quiet)}


class SuccessWatch:
    """Reads each hour's `_manifest.json` the moment its `_SUCCESS` is first listed: a claim of
    completeness is judged when it is made, not after everything has settled."""

    def __init__(self, services, bucket, topic, prefix="w"):
        self.services, self.bucket, self.prefix = services, bucket, "%s/%s/" % (prefix, topic)
        self.seen = {}  # hour dir -> (rows, revision, completeness)
        self.started = time.time()
        self.at = {}  # hour dir -> seconds after this watch started

    def look(self):
        for o in self.services.gcs_list(self.bucket, self.prefix):
            name = o["name"]
            if name.endswith("/_SUCCESS"):
                hour = name[len(self.prefix):-len("/_SUCCESS")]
                if hour not in self.seen:
                    m = json.loads(self.services.gcs_get(self.bucket, name[:-len("_SUCCESS")] + "_manifest.json"))
                    self.seen[hour] = (m["rows"], m["revision"], m["completeness"])
                    self.at[hour] = time.time() - self.started
        return self.seen
