"""An hour's CSV objects load into DuckDB (hive partitioning, the schema `bq-schema` prints) and
give back exactly what was sent, including commas, quotes, newlines, tabs and non-ASCII text."""
import datetime
import json
import os
import subprocess

import duckdb
from fluent import sender

import tron

NASTY = ["plain", "comma, inside", 'say "hi"', "line\nbreak", "tab\there", "ünïcödé ✓ 日本", "", "trailing\r"]

DUCK_TYPES = {"STRING": "VARCHAR", "INTEGER": "BIGINT", "FLOAT": "DOUBLE", "BOOLEAN": "BOOLEAN",
              "TIMESTAMP": "TIMESTAMPTZ", "JSON": "VARCHAR"}


def test_an_hour_loads_into_duckdb_with_the_printed_schema(services, certs, workroot, procs):
    work = os.path.join(workroot, "duckdb")
    relay, sink, host, port = tron.relay_to_gcs(services, certs, work, procs, "load", "load", 2, [
        {"name": "time", "source": "@time", "type": "TIMESTAMP"},
        {"name": "i", "source": "i", "type": "INTEGER"},
        {"name": "text", "source": "text", "type": "STRING"},
        {"name": "ok", "source": "ok", "type": "BOOLEAN"},
        {"name": "nested", "source": "nested", "type": "JSON"},
    ], plaintext=True)
    hour = datetime.datetime.now(datetime.timezone.utc).replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=3)
    log = sender.FluentSender("load", host=host, port=port, nanosecond_precision=True)
    sent = {}
    for i in range(200):
        rec = {"i": i, "text": NASTY[i % len(NASTY)] + " #%d" % i, "ok": i % 2 == 0, "nested": {"a": [i, "x,y"]}}
        assert log.emit_with_time("t", sender.EventTime(hour.timestamp() + i * 10 + 0.5), rec), log.last_error
        sent[i] = rec
    log.close()

    prefix = "w/load/dt=%s/hr=%s/" % (hour.strftime("%Y-%m-%d"), hour.strftime("%H"))
    tron.wait_until("the hour finalized", lambda: any(o["name"] == prefix + "_SUCCESS"
                                                       for o in services.gcs_list("load", prefix)),
                    timeout=60, interval=1, on_timeout=lambda: sink.tail())

    # Mirror the hour's objects to disk with their hive layout, as a loader would see them.
    local = os.path.join(work, "mirror")
    for obj in services.gcs_list("load", "w/load/"):
        if obj["name"].endswith(".csv.gz"):
            path = os.path.join(local, obj["name"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(services.gcs_get("load", obj["name"]))

    schema_path = os.path.join(work, "schema.json")
    out = subprocess.run([os.path.join(tron.BIN, "tron-sink-secor"), "--config", sink.config_path, "bq-schema",
                          "--topic", "load"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    with open(schema_path, "w") as f:
        f.write(out.stdout)
    columns = "{" + ", ".join("'%s': '%s'" % (c["name"], DUCK_TYPES[c["type"]]) for c in schema) + "}"
    # Rows end in \n and values hold quoted CRs: DuckDB must not sniff the line terminator (it
    # once picked \r when an object began with such a value), just as `bq load` is told
    # --allow_quoted_newlines.
    con = duckdb.connect()
    rows = con.execute(
        "SELECT epoch_us(time), i, text, ok, nested, dt, hr FROM read_csv('%s/w/load/*/*/*.csv.gz', header = false, "
        "columns = %s, hive_partitioning = true, quote = '\"', escape = '\"', delim = ',', auto_detect = false, "
        "new_line = '\\n') "
        "ORDER BY i" % (local, columns)).fetchall()
    assert len(rows) == 200, len(rows)
    for time_, i, text, ok, nested, dt, hr in rows:
        want = sent[i]
        assert text == want["text"], (i, text, want["text"])
        assert ok == want["ok"]
        assert json.loads(nested) == want["nested"]
        expected_us = int(hour.timestamp()) * 1_000_000 + i * 10_000_000 + 500_000
        assert time_ == expected_us, (i, time_, expected_us)
        assert str(dt) == hour.strftime("%Y-%m-%d") and int(hr) == hour.hour
