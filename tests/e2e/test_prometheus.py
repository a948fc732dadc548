"""The operator's kit (issue 26) against a real Prometheus (the Debian package) scraping a running
agent -> relay -> Kafka -> sink -> GCS pipeline plus `audit --watch`, every daemon logging with
`--log-format json`:
- the shipped rules (deploy/prometheus/tron.rules.yml) load and evaluate without error;
- every query of the shipped Grafana dashboard (deploy/grafana/tron.json) returns data;
- each alert fires in the scenario it is for, judged by the real Prometheus's alert state: an hour
  held back past hour end + lateness + 15 min (`TronHourNotFinalized`, with `tron-sink-secor hours`
  naming the host; it resolves once the host's watermark passes the hour), a line dated 2100 (`TronRecordsQuarantined`), the relay killed
  (`TronAgentDestinationFailing`, `TronAllHostsSilent`), and none of them before;
- the logs are one JSON object per line, warnings carry what they concern as fields.
The walk-through in docs/operations.md is this test's output (run with -s to see it)."""
import datetime
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest

import servers
import tron

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(ROOT, "deploy", "prometheus", "tron.rules.yml")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "tron.json")
PROMETHEUS = shutil.which("prometheus")
TOPIC = "prom"


class Prometheus:
    def __init__(self, work, targets):
        self.port = servers.free_port()
        self.log = os.path.join(work, "prometheus.log")
        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            json.dump({  # JSON is YAML
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [RULES],
                "scrape_configs": [{"job_name": "tron", "static_configs": [{"targets": targets}]}],
            }, f)
        self.proc = subprocess.Popen(
            [PROMETHEUS, "--config.file", config, "--storage.tsdb.path", os.path.join(work, "tsdb"),
             "--web.listen-address", "127.0.0.1:%d" % self.port],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        servers.wait_for("prometheus", lambda: servers.http_ok("http://127.0.0.1:%d/-/ready" % self.port),
                         timeout=60, proc=self.proc, log=self.log)

    def api(self, path, **params):
        url = "http://127.0.0.1:%d/api/v1/%s" % (self.port, path)
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def alerts(self, name):
        """The alert's instances as the real Prometheus evaluates the shipped rule:
        [(state, labels)], state `pending` (expression true, `for` not yet over) or `firing`."""
        return [(a["state"], a["labels"]) for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def alert_details(self, name):
        return [{k: a[k] for k in ("labels", "annotations", "state", "value")}
                for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def dashboard_queries():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def rfc3339(t):
    return t.isoformat().replace("+00:00", "Z")


class Writer(threading.Thread):
    """Appends lines to a file at a steady rate, each dated `age` before now, until stopped."""

    def __init__(self, path, age, per_second=50):
        super().__init__(daemon=True)
        self.path, self.age, self.per_second = path, age, per_second
        self.halt = threading.Event()
        self.seq = 0

    def run(self):
        while not self.halt.is_set():
            now = datetime.datetime.now(datetime.timezone.utc)
            with open(self.path, "a") as f:
                for _ in range(self.per_second):
                    f.write(json.dumps({"time": rfc3339(now - self.age), "seq": self.seq, "msg": "p" * 60}) + "\n")
                    self.seq += 1
            self.halt.wait(1)


def hours_table(sink):
    r = subprocess.run([os.path.join(tron.BIN, "tron-sink-secor"), "--config", sink.config_path, "hours",
                        "--topic", TOPIC], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def json_log_lines(proc):
    """Every line of a daemon's log, parsed: fails on a line that is not one JSON object."""
    with open(proc.log, errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError("%s: not a JSON log line: %r" % (proc.name, line))
    return parsed


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (tests/services/install.sh installs it)")
def test_alerts_and_dashboard_against_a_real_prometheus(services, certs, workroot, procs):
    work = os.path.join(workroot, "prometheus")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    services.create_topic(TOPIC, 2)
    services.create_gcs_bucket(TOPIC)
    services.create_s3_bucket(TOPIC + "-archive")
    json_logs = ["--log-format", "json"]
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, services.kafka_brokers, topic=TOPIC), work,
                      args=json_logs)
    sink_cfg = tron.sink_config(work, services.kafka_brokers, "gs://%s/w" % TOPIC, gcs_endpoint=services.gcs_endpoint,
                                topic=TOPIC, group=TOPIC)
    sink_cfg["finalize"] = {"lateness": "5s", "interval": "1s", "host_timeout": "20s"}
    sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work, args=json_logs)
    agent_cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "s3://%s/archive" % (TOPIC + "-archive"),
                                  relay.config["listen"], certs, s3_endpoint=services.s3_endpoint, host="web-7")
    del agent_cfg["files"]  # the shipped defaults
    for dest in agent_cfg["destinations"].values():
        del dest["batch"]
    agent = tron.Proc("agent", "tron-agent", agent_cfg, work, args=json_logs, env=servers.S3_CREDENTIALS)
    audit_port = servers.free_port()
    audit = tron.Proc("audit", "tron-sink-secor", dict(sink_cfg, metrics_listen="127.0.0.1:%d" % audit_port), work,
                      env=servers.S3_CREDENTIALS,
                      args=json_logs + ["audit", "--topic", TOPIC, "--archive", "s3://%s/archive" % (TOPIC + "-archive"),
                                        "--tag", "app.log", "--s3-endpoint", services.s3_endpoint, "--watch",
                                        "--hours", "3", "--interval", "5s", "--metrics-listen",
                                        "127.0.0.1:%d" % audit_port])
    procs.extend([relay, sink, agent, audit])
    for p in (relay, sink, agent, audit):
        p.start()
    prom = Prometheus(work, [p.config["metrics_listen"] for p in (relay, sink, agent, audit)])
    writers = [Writer(os.path.join(logs, "app.log"), datetime.timedelta(0)),
               # A batch job re-reading lines of two hours ago keeps the host's watermark there.
               Writer(os.path.join(logs, "replay.log"), datetime.timedelta(hours=2), per_second=5)]
    try:
        for w in writers:
            w.start()
        rules = prom.api("rules")["groups"]
        broken = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r.get("health") == "err"]
        assert len(rules) == 2 and not broken, (rules, broken)

        # 1. The held-back hour: overdue by more than 15 min -> TronHourNotFinalized fires, and
        #    `hours` names the host holding it.
        firing = tron.wait_until("TronHourNotFinalized firing", lambda: [
            a for a in prom.alerts("TronHourNotFinalized") if a[0] == "firing"], timeout=180, interval=2,
            on_timeout=lambda: prom.query("tron_sink_hour_overdue_seconds"))
        # The host's first watermark report may reach the sink's state a moment after the first rows.
        table = tron.wait_until("`hours` to name the host holding the hour", lambda: (
            lambda t: t if "web-7" in t else None)(hours_table(sink)), timeout=60, interval=1)
        tron.wait_until("tron_sink_hosts_holding_hours = 1", lambda: [
            r for r in prom.query("tron_sink_hosts_holding_hours") if r["value"][1] == "1"], timeout=60, interval=1)
        print("\n$ curl -s localhost:9090/api/v1/alerts  # TronHourNotFinalized\n"
              + json.dumps(prom.alert_details("TronHourNotFinalized"), indent=1))
        print("\n$ curl -s 'localhost:9090/api/v1/query?query=tron_sink_hosts_holding_hours'\n"
              + json.dumps(prom.query("tron_sink_hosts_holding_hours")))
        print("\n$ curl -s web-7:9466/metrics | grep low_watermark\n"
              + "\n".join(line for line in agent.metrics().splitlines() if "low_watermark" in line))
        print("\n$ tron-sink-secor hours --topic %s\n%s" % (TOPIC, table))
        assert firing[0][1]["topic"] == TOPIC
        assert "web-7" in table, table
        # The operator finds the replay on web-7 and lets it finish: the watermark moves on, the
        # hour is finalized and the alert resolves.
        writers[1].halt.set()
        tron.wait_until("TronHourNotFinalized resolved", lambda: not prom.alerts("TronHourNotFinalized"),
                        timeout=180, interval=2, on_timeout=lambda: hours_table(sink))
        table = hours_table(sink)
        print("\n$ tron-sink-secor hours --topic %s  # replay finished, alert resolved\n%s" % (TOPIC, table))
        oldest = table.splitlines()[1]  # hours are listed oldest first
        assert " yes " in oldest and "watermarks" in oldest, table

        # 2. Every dashboard query returns data (recording rules evaluate every 30 s; the audit
        #    needs a run).
        def empty_panels():
            return [(title, expr) for title, expr in dashboard_queries() if not prom.query(expr)]
        tron.wait_until("every dashboard query to return data", lambda: not empty_panels(), timeout=180,
                        interval=5, on_timeout=lambda: empty_panels())
        print("\n%d dashboard queries, each with data" % len(list(dashboard_queries())))

        # 3. A line dated 2100 -> quarantined -> TronRecordsQuarantined fires.
        assert not prom.alerts("TronRecordsQuarantined")
        with open(os.path.join(logs, "app.log"), "a") as f:
            f.write(json.dumps({"time": "2100-01-01T00:00:00Z", "seq": -1, "msg": "from the future"}) + "\n")
        quarantined = tron.wait_until("TronRecordsQuarantined firing", lambda: [
            a for a in prom.alerts("TronRecordsQuarantined") if a[0] == "firing"], timeout=120, interval=2)
        assert quarantined[0][1]["reason"] == "too_new", quarantined
        print("\n" + json.dumps(prom.alert_details("TronRecordsQuarantined"), indent=1))

        # 4. The relay killed: the agent's relay destination fails and every host goes silent. Not
        #    before: both expressions are false while the relay runs.
        assert not prom.alerts("TronAgentDestinationFailing") and not prom.alerts("TronAllHostsSilent")
        json_log_lines(relay)
        relay.kill()
        failing = tron.wait_until("TronAgentDestinationFailing pending", lambda: prom.alerts(
            "TronAgentDestinationFailing"), timeout=120, interval=2)
        assert failing[0][1]["part"] == "relay", failing
        silent = tron.wait_until("TronAllHostsSilent pending", lambda: prom.alerts("TronAllHostsSilent"),
                                 timeout=120, interval=2)
        assert silent[0][1]["topic"] == TOPIC, silent
        print("\n" + json.dumps(prom.alert_details("TronAgentDestinationFailing"), indent=1) + "\n"
              + json.dumps(prom.alert_details("TronAllHostsSilent"), indent=1))
        print("\n$ tron-sink-secor hours --topic %s  # relay down\n%s" % (TOPIC, hours_table(sink)))

        # 5. Logs: one JSON object per line; the agent's warning about the relay names it.
        for p in (sink, agent, audit):
            json_log_lines(p)
        warnings = [e for e in json_log_lines(agent) if e.get("level") == "WARN"]
        about_relay = [e for e in warnings if e.get("relay") == relay.config["listen"]]
        assert about_relay and all("message" in e and "timestamp" in e for e in about_relay), warnings[-5:]
        print("\n" + json.dumps(about_relay[-1]))
    finally:
        for w in writers:
            w.halt.set()
        prom.stop()
