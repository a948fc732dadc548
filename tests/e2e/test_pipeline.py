"""The spine, end to end against real servers: log files → tron-agent → (moto S3, and tron-relay
over TLS) → Tansu Kafka → tron-sink-secor → fake-gcs-server hour partitions."""
import csv
import datetime
import io
import json
import os
import time
from collections import Counter

import tron

LINES = 100_000
FILES = 2
GCS_BUCKET = "tron-gcs"
S3_BUCKET = "archive"


def event_time(seq, base):
    # Three whole hours, in the past, so they can all be finalized once the pipeline is idle.
    return base + datetime.timedelta(seconds=(seq * 3 * 3600) // LINES)


def line(seq, base):
    msg = "request %d" % seq
    if seq % 7 == 0:
        msg += ', with "quotes", commas\nand a newline, tab\tand ünïcode'
    return json.dumps({"time": event_time(seq, base).isoformat().replace("+00:00", "Z"), "seq": seq, "msg": msg})


def hour_prefix(t):
    return "dt=%s/hr=%s" % (t.strftime("%Y-%m-%d"), t.strftime("%H"))


def test_every_line_lands_once_in_its_hour_in_gcs_and_at_least_once_in_s3(services, certs, workroot, procs):
    work = os.path.join(workroot, "spine")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    services.create_topic("logs", 3)
    services.create_s3_bucket(S3_BUCKET)
    services.create_gcs_bucket(GCS_BUCKET)

    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, services.kafka_brokers), work)
    sink = tron.Proc("sink", "tron-sink-secor", tron.sink_config(
        work, services.kafka_brokers, "gs://%s/warehouse" % GCS_BUCKET, gcs_endpoint=services.gcs_endpoint), work)
    agent = tron.Proc("agent", "tron-agent", tron.agent_config(
        work, os.path.join(logs, "*.log"), "s3://%s/archive" % S3_BUCKET, relay.config["listen"], certs,
        s3_endpoint=services.s3_endpoint), work, env=servers_env())
    procs.extend([relay, sink, agent])
    relay.start()
    sink.start()
    agent.start()

    now = datetime.datetime.now(datetime.timezone.utc).replace(minute=0, second=0, microsecond=0)
    base = now - datetime.timedelta(hours=4)
    # Appended in rounds while the agent runs, to two files.
    files = [open(os.path.join(logs, "app-%d.log" % i), "a") for i in range(FILES)]
    for start in range(0, LINES, 10_000):
        for seq in range(start, start + 10_000):
            files[seq % FILES].write(line(seq, base) + "\n")
        for f in files:
            f.flush()
        time.sleep(0.2)
    for f in files:
        f.close()

    def gcs_rows():
        return list(tron.gcs_csv_rows_by_object(services, GCS_BUCKET, "warehouse/logs/"))

    def diagnose():
        return "\n".join("--- %s\n%s" % (p.name, p.tail()) for p in procs)

    tron.wait_until("all %d records in GCS" % LINES, lambda: len(gcs_rows()) >= LINES, timeout=300,
                    interval=3, on_timeout=diagnose)
    time.sleep(5)  # anything extra (a duplicate) would have landed by now
    rows = gcs_rows()
    seqs = Counter(int(row[3]) for _, row in rows)
    missing = [s for s in range(LINES) if seqs[s] == 0]
    dupes = {s: n for s, n in seqs.items() if n > 1}
    assert not missing, "missing %d records, e.g. %s" % (len(missing), missing[:10])
    assert not dupes, "duplicated %d records, e.g. %s" % (len(dupes), list(dupes.items())[:10])
    assert len(rows) == LINES
    for name, row in rows:
        seq = int(row[3])
        expected = event_time(seq, base)
        assert "/%s/" % hour_prefix(expected) in name, "seq %d (%s) landed in %s" % (seq, expected, name)
        assert row[0] == expected.strftime("%Y-%m-%dT%H:%M:%S.000000Z"), row
        assert row[1] == "app.log"
        assert json.loads(line(seq, base))["msg"] == row[4]
        assert len(row[2]) == 32  # the agent's deterministic _id

    # Each of the three hours is finalized with a manifest that accounts for every row.
    hours = sorted({hour_prefix(event_time(s, base)) for s in (0, LINES // 2, LINES - 1)})
    assert len(hours) == 3

    def finalized():
        names = {o["name"] for o in services.gcs_list(GCS_BUCKET, "warehouse/logs/")}
        return all("warehouse/logs/%s/_SUCCESS" % h in names for h in hours)

    tron.wait_until("_SUCCESS in all three hours", finalized, timeout=60, interval=1, on_timeout=diagnose)
    manifest_rows = sum(json.loads(services.gcs_get(GCS_BUCKET, "warehouse/logs/%s/_manifest.json" % h))["rows"]
                        for h in hours)
    assert manifest_rows == LINES

    # The S3 archive has every line at least once, in hourly gzip NDJSON objects.
    seen = Counter()
    for key, text in tron.s3_lines_by_object(services, S3_BUCKET, "archive/app.log/"):
        assert key.endswith(".ndjson.gz") and "/dt=" in key and "/hr=" in key, key
        rec = json.loads(text)
        seen[rec["seq"]] += 1
        assert "/%s/" % hour_prefix(event_time(rec["seq"], base)) in key
    missing_s3 = [s for s in range(LINES) if seen[s] == 0]
    assert not missing_s3, "S3 is missing %d lines, e.g. %s" % (len(missing_s3), missing_s3[:10])

    # Metrics and health while running, then a clean drain on SIGTERM.
    assert "tron_relay_chunks_acked_total" in relay.metrics()
    assert "tron_sink_objects_uploaded_total" in sink.metrics()
    assert "tron_agent_destination_lag_bytes" in agent.metrics()
    assert agent.health()[0] == 200, agent.health()
    assert relay.health()[0] == 200, relay.health()
    for p in (agent, relay, sink):
        assert p.stop() == 0, "%s did not exit cleanly:\n%s" % (p.name, p.tail())

    # The audit compares archive and warehouse id by id: clean, then exactly one deleted object.
    first, last = event_time(0, base), event_time(LINES - 1, base)
    audit_args = ["--topic", "logs", "--from", first.strftime("%Y-%m-%dT%H"), "--to", last.strftime("%Y-%m-%dT%H"),
                  "--archive", "s3://%s/archive" % S3_BUCKET, "--tag", "app.log", "--s3-endpoint", services.s3_endpoint]
    code, table, err = tron.audit(sink, *audit_args, env=servers_env())
    print("audit of the run:\n" + table)
    assert code == 0, (code, table, err)
    code, out, err = tron.audit(sink, *audit_args, "--json", env=servers_env())
    reports = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(reports) == 3, (code, out, err)
    for r in reports:
        assert r["missing_in_gcs"] == r["missing_in_archive"] == r["gcs_duplicate_rows"] == 0, r
        assert r["gcs_rows"] == r["gcs_ids"] == r["archive_ids"] and r["success"], r
        assert 0 < r["latency"]["p50_ms"] <= r["latency"]["p99_ms"] <= r["latency"]["max_ms"], r
    assert sum(r["gcs_rows"] for r in reports) == LINES
    middle = reports[1]["hour"]
    victim = next(o["name"] for o in services.gcs_list(GCS_BUCKET, "warehouse/logs/%s/" % hour_prefix(
        datetime.datetime.strptime(middle, "%Y-%m-%dT%H"))) if o["name"].endswith(".csv.gz"))
    victim_rows = len(list(csv.reader(io.StringIO("\n".join(tron.read_gz_lines(
        services.gcs_get(GCS_BUCKET, victim))) + "\n"))))
    services.gcs_delete(GCS_BUCKET, victim)
    code, out, err = tron.audit(sink, *audit_args, "--json", env=servers_env())
    after = {r["hour"]: r for r in map(json.loads, out.splitlines())}
    assert code == 1, (code, out, err)
    assert after[middle]["missing_in_gcs"] == victim_rows > 0, (victim_rows, after[middle])
    assert all(r["missing_in_gcs"] == 0 for h, r in after.items() if h != middle), after
    print("after deleting %s (%d rows): %s" % (victim, victim_rows, after[middle]))


def servers_env():
    return dict(tron.servers.S3_CREDENTIALS)
