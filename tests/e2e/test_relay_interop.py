"""Clients nobody here wrote talk to tron-relay; what they send arrives in Kafka (read back
through tron-sink-secor and fake-gcs-server) with the right tag, time and fields."""
import json
import os
import socket
import time

import msgpack
from fluent import sender

import tron


RECORD_COLUMNS = [
    {"name": "time", "source": "@time", "type": "TIMESTAMP"},
    {"name": "tag", "source": "@tag", "type": "STRING"},
    {"name": "record", "source": "@record", "type": "JSON"},
]




def test_fluent_logger_python_and_raw_forward_chunks_reach_kafka(services, certs, workroot, procs):
    relay, sink, host, port = tron.relay_to_gcs(services, certs, os.path.join(workroot, "interop"), procs, "interop",
                                                "interop", 2, RECORD_COLUMNS, plaintext=True)

    # 1. PyPI fluent-logger, Message mode with EventTime.
    log = sender.FluentSender("py", host=host, port=port, nanosecond_precision=True)
    # Event times of ten minutes ago: the sink quarantines records further than 7 days before
    # their Kafka timestamp (when the relay received them).
    base = int(time.time()) - 600
    for i in range(50):
        assert log.emit_with_time("evt", sender.EventTime(base + i + 0.5), {"i": i, "text": "héllo, \"world\""}), log.last_error
    log.close()

    # 2. A Forward-mode chunk packed by PyPI msgpack, asking for an ack.
    entries = [[base + 100 + i, {"j": i}] for i in range(50)]
    frame = msgpack.packb(["raw.forward", entries, {"chunk": "chunk-abc", "size": 50}])
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(frame)
        unpacker = msgpack.Unpacker(raw=False)
        deadline = time.time() + 20
        ack = None
        while ack is None and time.time() < deadline:
            unpacker.feed(s.recv(4096))
            for obj in unpacker:
                ack = obj
    assert ack == {"ack": "chunk-abc"}, ack

    def arrived():
        return len(tron.gcs_csv_rows(services, "interop", "w/interop/")) >= 100

    tron.wait_until("100 records from third-party clients", arrived, timeout=60, interval=1,
                    on_timeout=lambda: relay.tail() + sink.tail())
    rows = tron.gcs_csv_rows(services, "interop", "w/interop/")
    assert len(rows) == 100
    py = sorted((json.loads(r[2])["i"], r) for r in rows if r[1] == "py.evt")
    assert [i for i, _ in py] == list(range(50))
    for i, r in py:
        assert json.loads(r[2]) == {"i": i, "text": "héllo, \"world\""}
        assert r[0].endswith(":%02d.500000Z" % ((base + i) % 60)), r[0]
    raw = sorted(json.loads(r[2])["j"] for r in rows if r[1] == "raw.forward")
    assert raw == list(range(50))
    assert "tron_relay_chunks_acked_total 1" in relay.metrics()


def test_npm_fluent_logger_over_tls_with_shared_key_and_acks(services, certs, workroot, procs):
    import subprocess
    relay, sink, host, port = tron.relay_to_gcs(services, certs, os.path.join(workroot, "interop-npm"), procs, "npm",
                                                "npm-out", 2, RECORD_COLUMNS, shared_key="s3cr3t")
    script = os.path.join(tron.ROOT, "tests", "node", "send.js")
    modes = ["Message", "PackedForward", "CompressedPackedForward"]
    for mode in modes:
        out = subprocess.run(["node", script, host, str(port), certs["ca"], "s3cr3t", "30", mode],
                             capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, (mode, out.stdout, out.stderr, relay.tail())
        assert json.loads(out.stdout.strip().splitlines()[-1]) == {"acked": 30, "failed": 0}, out.stdout

    # A wrong shared key is refused with a logged reason, and nothing is acked.
    bad = subprocess.run(["node", script, host, str(port), certs["ca"], "wrong", "1", "Message", "5000"],
                         capture_output=True, text=True, timeout=90)
    assert bad.returncode != 0
    assert "shared_key mismatch" in relay.tail()

    tron.wait_until("90 npm records in Kafka", lambda: len(tron.gcs_csv_rows(services, "npm-out", "w/npm/")) >= 90, timeout=120,
                    on_timeout=lambda: sink.tail())
    rows = tron.gcs_csv_rows(services, "npm-out", "w/npm/")
    assert len(rows) == 90
    assert {r[1] for r in rows} == {"npm.evt"}
    assert sorted(json.loads(r[2])["i"] for r in rows) == sorted(list(range(30)) * 3)
    assert all(r[0].endswith(".250000Z") for r in rows)
