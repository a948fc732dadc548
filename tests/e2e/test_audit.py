"""`tron-sink-secor audit` on a small fixed data set in the real stores (moto S3 for the archive,
fake-gcs-server for the warehouse): the counts and the latency percentiles are checked against a
hand computation, and --watch exports them as gauges. The audit of a real end-to-end run is in
test_pipeline.py."""
import datetime
import gzip
import json
import math
import os
import subprocess
import urllib.request

import tron

TOPIC = "audited"
GCS_BUCKET = "auditfix"
S3_BUCKET = "auditarchive"


def upload_gcs(services, name, body):
    url = "%s/upload/storage/v1/b/%s/o?uploadType=media&name=%s" % (
        services.gcs_endpoint, GCS_BUCKET, urllib.request.quote(name, safe=""))
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/gzip"}, method="POST")
    return json.load(urllib.request.urlopen(req, timeout=10))


def rfc3339(t):
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def nearest_rank(values, p):
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def test_counts_and_latency_percentiles_match_a_hand_computation(services, workroot, procs):
    work = os.path.join(workroot, "audit-fixed")
    os.makedirs(work)
    services.create_s3_bucket(S3_BUCKET)
    services.create_gcs_bucket(GCS_BUCKET)
    now = datetime.datetime.now(datetime.timezone.utc)
    hour = now.replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=1)
    hour_dir = "dt=%s/hr=%s" % (hour.strftime("%Y-%m-%d"), hour.strftime("%H"))
    # 200 lines, one every 15 s of the hour; ids are tron-agent's 32 hex digits.
    events = {"%032x" % (i + 1): hour + datetime.timedelta(seconds=15 * i) for i in range(200)}
    ids = sorted(events)
    # The archive: two objects of one tag, one line in both (the agent may archive twice).
    s3 = services.s3_client()
    for n, part in enumerate((ids[:120], ids[119:])):
        body = "".join(json.dumps({"_time": rfc3339(events[i]), "msg": "m", "_id": i}) + "\n" for i in part)
        s3.put_object(Bucket=S3_BUCKET, Key="arch/app/%s/h-%d.ndjson.gz" % (hour_dir, n),
                      Body=gzip.compress(body.encode()))
    # The warehouse: ids[0:3] missing, ids[10] twice, one id the archive does not have, one row
    # without an id; in two objects written a moment apart.
    rows = [(events[i], i) for i in ids[3:100]] + [(events[ids[10]], ids[10])]
    later = [(events[i], i) for i in ids[100:]] + [(hour, "%032x" % 999), (hour, "")]
    created = []
    for n, part in enumerate((rows, later)):
        text = "".join("%s,%s,m\n" % (rfc3339(t), i) for t, i in part)
        meta = upload_gcs(services, "w/%s/%s/%s-0-%020d.csv.gz" % (TOPIC, hour_dir, TOPIC, n * 100),
                          gzip.compress(text.encode()))
        created.append(datetime.datetime.fromisoformat(meta["timeCreated"].replace("Z", "+00:00")))
    # Hand computation: per distinct id in GCS with an event time, first object's time - event.
    first_object = {}
    for n, part in enumerate((rows, later)):
        for t, i in part:
            if i:
                first_object.setdefault(i, (created[n], t))
    latencies = [max(0, round((c - t).total_seconds() * 1000)) for c, t in first_object.values()]
    expected = {"p50_ms": nearest_rank(latencies, 50), "p99_ms": nearest_rank(latencies, 99),
                "max_ms": max(latencies), "ids": len(latencies)}

    sink = tron.Proc("sink", "tron-sink-secor", tron.sink_config(
        work, services.kafka_brokers, "gs://%s/w" % GCS_BUCKET, gcs_endpoint=services.gcs_endpoint, topic=TOPIC,
        finalize={"lateness": "1s", "interval": "1s"}), work)
    sink.config["output"]["columns"] = [{"name": "time", "source": "@time", "type": "TIMESTAMP"},
                                        {"name": "id", "source": "_id", "type": "STRING"},
                                        {"name": "msg", "source": "msg", "type": "STRING"}]
    sink.__init__(sink.name, "tron-sink-secor", sink.config, work)
    env = dict(tron.servers.S3_CREDENTIALS)
    args = ["--topic", TOPIC, "--from", hour.strftime("%Y-%m-%dT%H"), "--archive", "s3://%s/arch" % S3_BUCKET,
            "--tag", "app", "--s3-endpoint", services.s3_endpoint]
    code, out, err = tron.audit(sink, *args, "--json", env=env)
    assert code == 1, (code, out, err)
    (report,) = [json.loads(line) for line in out.splitlines()]
    assert report["archive_objects"] == 2 and report["gcs_objects"] == 2, report
    assert report["archive_rows"] == 201 and report["archive_ids"] == 200 and report["archive_duplicate_rows"] == 1
    assert report["gcs_rows"] == 200 and report["gcs_ids"] == 198 and report["gcs_rows_without_id"] == 1, report
    assert report["missing_in_gcs"] == 3 and report["missing_in_archive"] == 1, report
    assert report["gcs_duplicate_rows"] == 1 and not report["success"], report
    # Event times come from the archive (or the row's @time column when the archive lacks the id).
    latency = report["latency"]
    assert abs(latency["p50_ms"] - expected["p50_ms"]) <= 1, (latency, expected)
    assert abs(latency["p99_ms"] - expected["p99_ms"]) <= 1, (latency, expected)
    assert abs(latency["max_ms"] - expected["max_ms"]) <= 1, (latency, expected)
    assert latency["ids"] == expected["ids"], (latency, expected)

    code, table, err = tron.audit(sink, *args, env=env)
    assert code == 1 and "miss_gcs" in table.splitlines()[0], (code, table, err)
    print(table)

    # Bad input is named.
    code, out, err = tron.audit(sink, *args[:2], "--from", "yesterday", *args[4:], env=env)
    assert code == 2 and "--from" in err, (code, err)
    code, out, err = tron.audit(sink, "--topic", "nope", *args[2:], env=env)
    assert code == 2 and "kafka.topics" in err, (code, err)

    # --watch: the same figures as gauges, for the last finished hour.
    port = tron.servers.free_port()
    watcher = subprocess.Popen([os.path.join(tron.BIN, "tron-sink-secor"), "--config", sink.config_path, "audit",
                                *[a for a in args if a not in ("--from", hour.strftime("%Y-%m-%dT%H"))],
                                "--watch", "--hours", "1", "--interval", "2s", "--metrics-listen", "127.0.0.1:%d" % port],
                               env=dict(os.environ, **env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def gauges():
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
                text = r.read().decode()
            value = tron.metric(text, "tron_audit_missing_records", topic=TOPIC, hour=report["hour"], side="gcs")
            return text if value == 3 else None

        text = tron.wait_until("audit gauges", lambda: _quiet(gauges), timeout=60, interval=1)
        assert tron.metric(text, "tron_audit_missing_records", topic=TOPIC, hour=report["hour"], side="archive") == 1
        assert tron.metric(text, "tron_audit_duplicate_rows", topic=TOPIC, hour=report["hour"], side="gcs") == 1
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=5) as r:
            assert r.status == 200
    finally:
        watcher.terminate()
        assert watcher.wait(30) == 0, watcher.stderr.read().decode()[-2000:]


def _quiet(check):
    try:
        return check()
    except OSError:
        return None
