"""Operating the daemons as systemd would: SIGTERM drains under load with nothing lost (counted end
to end), /metrics and /health say what the docs say, the sd_notify protocol (READY, WATCHDOG,
RELOADING, STOPPING) is spoken, and SIGHUP reloads the agent's sources and the relay's certificate
without losing position."""
import json
import re
import os
import signal
import socket
import ssl
import threading
import time
from collections import Counter

import certs as certs_mod
import test_crash
import tron


def test_sigterm_under_load_drains_every_component_and_loses_nothing(services, certs, workroot, procs):
    work = os.path.join(workroot, "drain")
    services.create_s3_bucket("drain-archive")
    relay, sink, agent = test_crash.pipeline(services, certs, work, "drain", "drain", s3_bucket="drain-archive")
    procs.extend([relay, sink, agent])
    relay.start(), sink.start(), agent.start()
    total = 40_000
    writer = threading.Thread(target=test_crash.write_lines,
                              args=(os.path.join(work, "logs", "a.log"), total, 4000))
    writer.start()

    tron.wait_until("the sink's first upload",
                    lambda: tron.metric(sink.metrics(), "tron_sink_records_uploaded_total", topic="drain"), timeout=30,
                    interval=0.5)
    scraped = {p.name: p.metrics() for p in (relay, sink, agent)}
    health = {p.name: p.health() for p in (relay, sink, agent)}
    # Each stop is timed: a drain must finish well inside systemd's TimeoutStopSec (60 s).
    stops = []
    for proc in (relay, agent, sink, relay, agent, sink):
        time.sleep(1.5)
        began = time.time()
        code = proc.stop(timeout=60)
        stops.append((proc.name, code, round(time.time() - began, 2)))
        assert code == 0, "%s exited %s on SIGTERM\n%s" % (proc.name, code, proc.tail())
        assert "drained; bye" in proc.tail(), proc.tail()
        time.sleep(0.5)
        proc.start()
    writer.join()

    def seqs():
        return Counter(int(r[1]) for r in tron.gcs_csv_rows(services, "drain", "w/drain/"))

    tron.wait_until("every line in GCS after SIGTERM of each component under load",
                    lambda: set(seqs()) >= set(range(total)), timeout=180, interval=3,
                    on_timeout=lambda: agent.tail() + relay.tail())
    time.sleep(3)
    seen = seqs()
    assert set(seen) == set(range(total))
    duplicates = sum(n - 1 for n in seen.values())
    # A clean drain acks what Kafka has and commits what is uploaded: nothing is sent twice.
    assert duplicates == 0, "%d lines arrived more than once after clean drains" % duplicates
    print("drain test: %d lines, stops (component, exit, seconds): %s, duplicates %d"
          % (total, stops, duplicates))

    # What the metrics reference (docs/metrics.md) promises, seen during the run.
    a, r, s = scraped["agent"], scraped["relay"], scraped["sink"]
    for dest in ("s3", "relay"):
        assert tron.metric(a, "tron_agent_lines_read_total", destination=dest) > 0, a
        assert tron.metric(a, "tron_agent_records_sent_total", destination=dest) > 0, a
        assert tron.metric(a, "tron_agent_destination_lag_bytes", destination=dest) is not None, a
    assert tron.metric(a, "tron_agent_files_tracked") == 1
    assert tron.metric(r, "tron_relay_records_received_total") > 0
    assert tron.metric(r, "tron_relay_records_delivered_total") > 0
    assert tron.metric(r, "tron_relay_chunks_acked_total") > 0
    assert tron.metric(r, "tron_relay_connections") == 1
    assert tron.metric(r, "tron_relay_inflight_bytes") is not None
    assert tron.metric(r, "tron_relay_event_to_kafka_seconds_count") > 0
    assert 'tron_relay_event_to_kafka_seconds_bucket{le="+Inf"}' in r
    assert tron.metric(s, "tron_sink_records_consumed_total", topic="drain") > 0
    assert tron.metric(s, "tron_sink_records_uploaded_total", topic="drain") > 0
    assert tron.metric(s, "tron_sink_event_to_object_seconds_count") > 0
    for name, (code, body) in health.items():
        assert code == 200 and body["status"] == "ok", (name, code, body)
    assert "kafka" in health["relay"][1]["parts"] and {"kafka", "gcs"} <= set(health["sink"][1]["parts"])
    # Every metric a daemon emits is in the reference, and each says which build it is.
    documented = set(re.findall(r"`(tron_[a-z0-9_]+)", open(os.path.join(tron.ROOT, "docs", "metrics.md")).read()))
    for name, text in scraped.items():
        emitted = {re.sub(r"_(bucket|sum|count)$", "", m) if m not in documented else m
                   for m in re.findall(r"^(tron_[a-z0-9_]+)", text, re.M)}
        assert emitted <= documented, "%s emits metrics docs/metrics.md does not list: %s" % (name, sorted(emitted - documented))
        assert re.search(r'^tron_build_info\{.*commit="[0-9a-f]{12}".*\} 1$', text, re.M), (name, text[:2000])
    assert set(health["agent"][1]["parts"]) == {"s3", "relay"}


def test_health_is_503_with_the_reason_when_kafka_is_unreachable(certs, workroot, procs):
    work = os.path.join(workroot, "health-503")
    os.makedirs(work)
    dead = "127.0.0.1:%d" % tron.servers.free_port()
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, dead), work)
    procs.append(relay)
    relay.start()
    code, body = tron.wait_until("relay /health 503", lambda: (lambda h: h if h[0] == 503 else None)(relay.health()),
                                 timeout=30, interval=0.5)
    assert body["status"] == "unhealthy"
    assert "kafka" in body["reasons"] and body["reasons"]["kafka"].startswith("brokers unreachable"), body
    assert relay.stop() == 0


class NotifySocket:
    """Stands in for systemd's notification socket: collects what a service sends."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages = []

    def drain(self):
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                return self.messages

    def wait_for(self, state, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.drain()
            if any(state in m.split("\n") for m in self.messages):
                return
        raise AssertionError("no %s from the service; got %s" % (state, self.messages))


def test_sd_notify_ready_watchdog_reload_and_stopping(services, certs, workroot, procs):
    """Type=notify with WatchdogSec: READY after start, WATCHDOG pings from live main loops,
    RELOADING then READY around SIGHUP, STOPPING on SIGTERM, for each binary."""
    work = os.path.join(workroot, "notify")
    os.makedirs(os.path.join(work, "logs"))
    services.create_topic("notify", 1)
    services.create_gcs_bucket("notify")
    configs = {
        "relay": ("tron-relay", tron.relay_config(work, certs, services.kafka_brokers, topic="notify")),
        "sink": ("tron-sink-secor", tron.sink_config(work, services.kafka_brokers, "gs://notify/w",
                                                     gcs_endpoint=services.gcs_endpoint, topic="notify",
                                                     group="notify")),
    }
    agent_cfg = tron.agent_config(work, os.path.join(work, "logs", "*.log"),
                                  "file://" + os.path.join(work, "s3"), None, certs)
    configs["agent"] = ("tron-agent", agent_cfg)
    for name, (binary, cfg) in configs.items():
        sock = NotifySocket(os.path.join(work, name + ".notify"))
        # 1 s watchdog: pings every 0.5 s while the main loops turn.
        proc = tron.Proc(name, binary, cfg, work,
                         env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "1000000"})
        procs.append(proc)
        proc.start()
        sock.wait_for("READY=1")
        time.sleep(2.2)
        pings = sum(m.split("\n").count("WATCHDOG=1") for m in sock.drain())
        assert pings >= 3, "%s: %d watchdog pings in 2.2 s with WatchdogSec=1s" % (name, pings)
        if name in ("agent", "relay"):
            sock.messages.clear()
            proc.proc.send_signal(signal.SIGHUP)
            sock.wait_for("RELOADING=1")
            sock.wait_for("READY=1")
        assert proc.stop() == 0
        sock.wait_for("STOPPING=1")


def test_agent_sighup_follows_new_sources_keeps_position_and_refuses_a_bad_file(workroot, certs, procs):
    work = os.path.join(workroot, "reload")
    for d in ("a", "b"):
        os.makedirs(os.path.join(work, d))
    archive = os.path.join(work, "s3")
    cfg = tron.agent_config(work, os.path.join(work, "a", "*.log"), "file://" + archive, None, certs)
    cfg["destinations"]["s3"]["batch"]["max_age"] = "200ms"
    agent = tron.Proc("agent", "tron-agent", cfg, work)
    procs.append(agent)
    agent.start()

    def write(path, start, n):
        with open(path, "a") as f:
            for i in range(start, start + n):
                f.write('{"seq": %d, "msg": "%s"}\n' % (i, path))

    def archived():
        seen = Counter()
        for dirpath, _, files in os.walk(archive):
            for name in files:
                if name.endswith(".ndjson.gz"):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        for line in tron.read_gz_lines(f.read()):
                            record = json.loads(line)
                            seen[(record["file"], record["seq"])] += 1
        return seen

    a_log, b_log = os.path.join(work, "a", "x.log"), os.path.join(work, "b", "y.log")
    write(a_log, 0, 1000)
    write(b_log, 0, 1000)
    tron.wait_until("a/x.log archived", lambda: sum(1 for f, _ in archived() if f == a_log) == 1000, timeout=30,
                    interval=0.5)
    time.sleep(1)
    assert not any(f == b_log for f, _ in archived())

    # A file with a typo: nothing changes, the error names the key.
    with open(agent.config_path, "a") as f:
        f.write("\n[filez]\n")
    agent.proc.send_signal(signal.SIGHUP)
    tron.wait_until("reload refused", lambda: "reload refused" in agent.tail(), timeout=10, interval=0.3)
    assert "key `filez`" in agent.tail(), agent.tail()
    assert agent.running()

    # A second source: b/ is followed from its start; a/ keeps its position.
    cfg["sources"].append({"name": "b", "include": [os.path.join(work, "b", "*.log")], "tag": "b.log",
                           "parser": "json"})
    with open(agent.config_path, "w") as f:
        f.write(tron.to_toml(cfg))
    agent.proc.send_signal(signal.SIGHUP)
    write(a_log, 1000, 1000)
    write(b_log, 1000, 1000)

    def done():
        seen = archived()
        return sum(1 for f, _ in seen if f == a_log) == 2000 and sum(1 for f, _ in seen if f == b_log) == 2000

    tron.wait_until("both files archived after the reload", done, timeout=30, interval=0.5,
                    on_timeout=agent.tail)
    seen = archived()
    assert max(seen.values()) == 1, "lines re-read after reload: %s" % [k for k, n in seen.items() if n > 1][:5]

    # A change only a restart applies is refused with its key named, never reported as ok.
    cfg["files"]["scan_interval"] = "5s"
    with open(agent.config_path, "w") as f:
        f.write(tron.to_toml(cfg))
    agent.proc.send_signal(signal.SIGHUP)
    tron.wait_until("a reload of files.* refused", lambda: "files changed, which a reload cannot apply" in agent.tail(),
                    timeout=10, interval=0.3, on_timeout=agent.tail)
    m = agent.metrics()
    assert tron.metric(m, "tron_agent_reloads_total", result="ok") == 1
    assert tron.metric(m, "tron_agent_reloads_total", result="refused") == 2
    assert agent.stop() == 0


def test_a_reload_that_adds_a_source_adds_its_tag_to_the_watermark_reports(services, certs, workroot, procs):
    """A source added by SIGHUP holds hours of its topic back like the others: its tag is in the
    agent's watermark reports, so the relay writes the host's watermark to that topic too."""
    work = os.path.join(workroot, "reload-tags")
    for d in ("a", "b"):
        os.makedirs(os.path.join(work, d))
    services.create_topic("reload-a", 1)
    services.create_topic("reload-b", 1)
    relay_cfg = tron.relay_config(work, certs, services.kafka_brokers, topic="reload-a")
    relay_cfg["kafka"]["routes"] = [{"pattern": "b.**", "topic": "reload-b"}]
    relay_cfg["kafka"]["watermark_interval"] = "1s"
    relay = tron.Proc("relay", "tron-relay", relay_cfg, work)
    cfg = tron.agent_config(work, os.path.join(work, "a", "*.log"), "file://" + os.path.join(work, "s3"),
                            relay_cfg["listen"], certs, host="reload-host")
    cfg["sources"][0]["tag"] = "a.log"
    cfg["destinations"]["relay"]["watermark_interval"] = "1s"
    agent = tron.Proc("agent", "tron-agent", cfg, work)
    procs.extend([relay, agent])
    relay.start(), agent.start()
    with open(os.path.join(work, "a", "x.log"), "w") as f:
        f.write('{"seq": 1}\n')

    def hosts(topic):
        return {h for _, _, v in tron.watermark_messages(services.kafka_brokers, topic, quiet=2, limit=8)
                for h in v["tron_watermarks"]}
    tron.wait_until("reload-host's watermark in reload-a", lambda: "reload-host" in hosts("reload-a"), timeout=30,
                    interval=1, on_timeout=agent.tail)
    assert "reload-host" not in hosts("reload-b")
    cfg["sources"].append({"name": "b", "include": [os.path.join(work, "b", "*.log")], "tag": "b.log",
                           "parser": "json"})
    with open(agent.config_path, "w") as f:
        f.write(tron.to_toml(cfg))
    agent.proc.send_signal(signal.SIGHUP)
    tron.wait_until("reload-host's watermark in reload-b after the reload", lambda: "reload-host" in hosts("reload-b"),
                    timeout=30, interval=1, on_timeout=agent.tail)
    assert tron.metric(agent.metrics(), "tron_agent_reloads_total", result="ok") == 1
    assert agent.stop() == 0


def test_relay_sighup_reloads_the_certificate_for_new_connections(services, certs, workroot, procs):
    work = os.path.join(workroot, "cert-reload")
    os.makedirs(work)
    live = {"cert": os.path.join(work, "live.pem"), "key": os.path.join(work, "live.key")}

    def install(paths):
        for src, dst in ((paths["server_cert"], live["cert"]), (paths["server_key"], live["key"])):
            with open(src, "rb") as f, open(dst + ".tmp", "wb") as g:
                g.write(f.read())
            os.replace(dst + ".tmp", dst)

    install(certs)
    cfg = tron.relay_config(work, certs, services.kafka_brokers)
    cfg["tls"] = dict(live)
    relay = tron.Proc("relay", "tron-relay", cfg, work)
    procs.append(relay)
    relay.start()
    host, port = relay.config["listen"].rsplit(":", 1)

    def handshake_ok(ca):
        ctx = ssl.create_default_context(cafile=ca)
        try:
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost"):
                    return True
        except ssl.SSLError:
            return False

    renewed = certs_mod.make(os.path.join(work, "renewed"), name="renewed")
    assert handshake_ok(certs["ca"]) and not handshake_ok(renewed["ca"])
    install(renewed)
    relay.proc.send_signal(signal.SIGHUP)
    tron.wait_until("relay serves the renewed certificate", lambda: handshake_ok(renewed["ca"]), timeout=10,
                    interval=0.3, on_timeout=relay.tail)
    assert not handshake_ok(certs["ca"])
    assert tron.metric(relay.metrics(), "tron_relay_reloads_total", result="ok") == 1
    assert relay.stop() == 0
