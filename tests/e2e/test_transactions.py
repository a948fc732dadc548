"""A topic written by a transactional producer (PyPI confluent-kafka): commit and abort markers
leave offset gaps. The sink reads committed records only, puts each in exactly one object, and
still finalizes the hour although the partitions end in control records (their end offset is
never the offset of a record the sink saw)."""
import datetime
import json
import os

from confluent_kafka import Producer

import tron


def test_transactional_topic_gaps_and_aborts(services, certs, workroot, procs):
    work = os.path.join(workroot, "transactions")
    os.makedirs(work)
    services.create_topic("txn", 2)
    services.create_gcs_bucket("txn")
    hour = datetime.datetime.now(datetime.timezone.utc).replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=2)
    producer = Producer({"bootstrap.servers": services.kafka_brokers, "transactional.id": "tron-e2e-txn",
                         "enable.idempotence": True, "log_level": 3})
    producer.init_transactions(30)
    committed, aborted = [], []
    seq = 0
    for txn in range(6):
        producer.begin_transaction()
        batch = []
        for _ in range(50):
            ts = int(hour.timestamp() * 1000) + seq * 1000
            producer.produce("txn", value=json.dumps({"seq": seq}).encode(), partition=seq % 2, timestamp=ts)
            batch.append(seq)
            seq += 1
        if txn % 3 == 1:
            producer.abort_transaction(30)
            aborted.extend(batch)
        else:
            producer.commit_transaction(30)
            committed.extend(batch)

    sink = tron.start_sink(procs, services, work, "gs://txn/w", "txn", columns=[
        {"name": "seq", "source": "seq", "type": "INTEGER"},
        {"name": "p", "source": "@partition", "type": "INTEGER"},
        {"name": "o", "source": "@offset", "type": "INTEGER"}])
    prefix = "w/txn/dt=%s/hr=%s/" % (hour.strftime("%Y-%m-%d"), hour.strftime("%H"))
    tron.wait_until("_SUCCESS for the hour of a transactional topic",
                    lambda: prefix + "_SUCCESS" in {o["name"] for o in services.gcs_list("txn", prefix)},
                    timeout=60, interval=0.5, on_timeout=sink.tail)
    rows = tron.gcs_csv_rows(services, "txn", "w/txn/")
    seqs = sorted(int(r[0]) for r in rows)
    assert seqs == sorted(committed), "aborted in GCS: %s; missing: %s" % (
        sorted(set(seqs) & set(aborted))[:5], sorted(set(committed) - set(seqs))[:5])
    offsets = [(int(r[1]), int(r[2])) for r in rows]
    assert len(offsets) == len(set(offsets))
    manifest = json.loads(services.gcs_get("txn", prefix + "_manifest.json"))
    assert manifest["rows"] == len(committed), manifest
    span = {p: max(o for q, o in offsets if q == p) + 1 for p, _ in offsets}
    print("transactions: %d committed records in GCS once each, %d aborted left out, hour finalized; "
          "offsets spanned per partition %s for %d records" % (len(committed), len(aborted), span, len(offsets)))
    producer.flush(5)
