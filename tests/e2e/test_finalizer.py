"""Hour finalization: idle partitions do not hold an hour back, late records revise the manifest."""
import datetime
import json
import os
import time

from fluent import sender

import tron


def test_idle_partitions_do_not_block_and_late_records_revise_the_manifest(services, certs, workroot, procs):
    relay, sink, host, port = tron.relay_to_gcs(services, certs, os.path.join(workroot, "finalizer"), procs, "fin", "fin",
                                                8, plaintext=True)
    hour = datetime.datetime.now(datetime.timezone.utc).replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=2)
    prefix = "w/fin/dt=%s/hr=%s/" % (hour.strftime("%Y-%m-%d"), hour.strftime("%H"))

    def send(n, first):
        log = sender.FluentSender("app", host=host, port=port, nanosecond_precision=True)
        for i in range(first, first + n):
            assert log.emit_with_time("x", sender.EventTime(hour.timestamp() + 60 + i), {"seq": i}), log.last_error
        log.close()

    send(3, 0)  # three records: at most three of the eight partitions get data
    start = time.time()

    def names():
        return {o["name"] for o in services.gcs_list("fin", prefix)}

    tron.wait_until("_SUCCESS with five or more idle partitions", lambda: prefix + "_SUCCESS" in names(), timeout=60,
                    interval=0.5, on_timeout=lambda: sink.tail())
    print("hour finalized %.1fs after its records were sent (idle_after 2s, finalize interval 1s)" % (time.time() - start))
    manifest = json.loads(services.gcs_get("fin", prefix + "_manifest.json"))
    assert manifest["revision"] == 1 and manifest["rows"] == 3, manifest
    # fluent-logger sends no watermarks: the hour was decided by event times, and it says so.
    assert manifest["completeness"]["rule"] == "event_time", manifest["completeness"]
    assert all(o["name"].startswith(prefix) for o in manifest["objects"])

    send(2, 100)  # late: the hour is already complete

    # Each late object revises the manifest: the two records may land in two partitions and be
    # uploaded by two cuts, so two revisions (2 and 3) are as right as one.
    def revised():
        m = json.loads(services.gcs_get("fin", prefix + "_manifest.json"))
        return m if m["rows"] == 5 else None

    m = tron.wait_until("a manifest revision with the late rows", revised, timeout=60, interval=0.5,
                        on_timeout=lambda: sink.tail())
    assert 2 <= m["revision"] <= 3, m
    assert "tron_sink_late_objects_total" in sink.metrics()


def test_success_only_after_every_record_is_uploaded_and_soon_after_the_last_partition_passes(
        services, certs, workroot, procs):
    """Four partitions get records of hour H, then records past H's end plus the lateness, all at
    once. `_SUCCESS` for H must not exist before every record of H is in an object listed by the
    manifest. How soon after the last partition passed the hour it appears is printed (a
    measurement, not an assertion: timings belong to bench/); it must appear within 60 s."""
    relay, sink, host, port = tron.relay_to_gcs(services, certs, os.path.join(workroot, "fin-timing"), procs,
                                                "fintime", "fintime", 4, plaintext=True)
    lateness, max_age, interval = 5, 3, 1  # tron.sink_config: finalize.lateness, roll.max_age, finalize.interval
    hour = datetime.datetime.now(datetime.timezone.utc).replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=3)
    prefix = "w/fintime/dt=%s/hr=%s/" % (hour.strftime("%Y-%m-%d"), hour.strftime("%H"))
    log = sender.FluentSender("app", host=host, port=port, nanosecond_precision=True)
    for i in range(400):
        assert log.emit_with_time("x", sender.EventTime(hour.timestamp() + 5 * i), {"seq": i}), log.last_error
    for i in range(400):  # ten minutes past the hour's end: every partition moves past H + lateness
        assert log.emit_with_time("x", sender.EventTime(hour.timestamp() + 4200 + i), {"seq": 1000 + i}), log.last_error
    log.close()
    passed_at = time.time()

    def success():
        names = {o["name"] for o in services.gcs_list("fintime", prefix)}
        return time.time() if prefix + "_SUCCESS" in names else None

    seen_at = tron.wait_until("_SUCCESS for the hour", success, timeout=60, interval=0.25, on_timeout=sink.tail)
    delay = seen_at - passed_at
    manifest = json.loads(services.gcs_get("fintime", prefix + "_manifest.json"))
    assert manifest["rows"] == 400 and manifest["revision"] == 1, manifest
    rows = 0
    for obj in manifest["objects"]:
        rows += len(tron.read_gz_lines(services.gcs_get("fintime", obj["name"])))
    assert rows == 400, "the manifest's objects hold %d rows" % rows
    print("hour finalized %.1fs after every partition passed it (lateness %ds + roll.max_age %ds + "
          "finalize.interval %ds = %ds)" % (delay, lateness, max_age, interval, lateness + max_age + interval))
