"""The sink's memory at its shipped defaults while it catches up on a backlog: what librdkafka
reads ahead is bounded by the sink's fetch (2 MiB) and queue (16 MiB) settings, not by the size of
the backlog (docs/capacity.md). The backlog is written the way the relay writes it (LZ4 batches of
up to 1 MiB, PyPI confluent-kafka), with log lines that compress like real ones, and the sink gets
no setting but the ones a config must have."""
import datetime
import json
import os
import random

from confluent_kafka import Producer

import tron

RECORDS = 400_000
# Measured here: 71 MiB at the defaults; 105 MiB with librdkafka's own (50 MiB fetches, 64 MiB
# queue), which this bound fails. (Padded, more compressible lines reach 110 and 230 MiB: bench/.)
PEAK_RSS_BOUND_MIB = 90


def produce_backlog(brokers, topic, n, hour):
    producer = Producer({"bootstrap.servers": brokers, "compression.type": "lz4", "linger.ms": 20,
                         "batch.size": 1 << 20, "log_level": 3})
    rnd = random.Random(11)
    paths = ["/api/v1/items/%d" % i for i in range(500)]
    agents = ["Mozilla/5.0 (X11; Linux x86_64) Firefox/%d.0" % v for v in range(100, 140)]
    base_ms = int(hour.timestamp() * 1000)
    for i in range(n):
        line = json.dumps({"time": base_ms + i // 200, "seq": i, "method": rnd.choice(("GET", "POST", "PUT")),
                           "path": rnd.choice(paths), "status": rnd.choice((200, 200, 200, 304, 404, 500)),
                           "bytes": rnd.randrange(100, 90000), "ua": rnd.choice(agents),
                           "request_id": "%032x" % rnd.getrandbits(128)})
        while True:
            try:
                producer.produce(topic, value=line.encode(), timestamp=base_ms + i // 200)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0


def test_sink_catching_up_a_backlog_stays_within_its_memory_bound_at_defaults(services, workroot, procs):
    work = os.path.join(workroot, "sink-memory")
    os.makedirs(work)
    services.create_topic("backlog", 1)
    services.create_gcs_bucket("backlog")
    hour = datetime.datetime.now(datetime.timezone.utc).replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=3)
    produce_backlog(services.kafka_brokers, "backlog", RECORDS, hour)

    sink = tron.start_sink(procs, services, work, "gs://backlog/w", "backlog", shipped_timing=True, columns=[
        {"name": "time", "source": "@time", "type": "TIMESTAMP"},
        {"name": "seq", "source": "seq", "type": "INTEGER"},
        {"name": "record", "source": "@record", "type": "JSON"}])
    tron.wait_until("every backlog record uploaded",
                    lambda: (sink.metric("tron_sink_records_uploaded_total") or 0) >= RECORDS,
                    timeout=300, interval=1.0, on_timeout=sink.tail)
    peak = sink.peak_rss_mib()
    print("sink peak RSS %.1f MiB catching up %d records at defaults" % (peak, RECORDS))
    assert peak < PEAK_RSS_BOUND_MIB, "sink peak RSS %.1f MiB over its %d MiB bound" % (peak, PEAK_RSS_BOUND_MIB)
    rows = tron.gcs_csv_rows(services, "backlog", "w/backlog/")
    seqs = [int(r[1]) for r in rows]
    assert len(seqs) == RECORDS and set(seqs) == set(range(RECORDS))
