"""The S3 archive against moto: a batch larger than multipart_threshold_bytes goes up as a
multipart upload (S3 marks such objects with an ETag ending in -PARTS) and holds every line."""
import base64
import json
import os
import random

import tron


def test_large_batches_use_multipart_and_keep_every_line(services, certs, workroot, procs):
    work = os.path.join(workroot, "multipart")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    services.create_s3_bucket("multipart")
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "s3://multipart/a", None, certs,
                            s3_endpoint=services.s3_endpoint)
    s3 = cfg["destinations"]["s3"]
    s3.update(multipart_threshold_bytes=5 << 20, multipart_part_bytes=5 << 20, gzip_level=1)
    s3["batch"].update(max_bytes=32 << 20, max_age="3s")
    rng = random.Random(5)
    lines = 100_000
    with open(os.path.join(logs, "big.log"), "w") as f:  # ~14 MB of incompressible text
        for i in range(lines):
            f.write(json.dumps({"seq": i, "noise": base64.b64encode(rng.randbytes(96)).decode()}) + "\n")
    agent = tron.Proc("agent", "tron-agent", cfg, work, env=dict(tron.servers.S3_CREDENTIALS))
    procs.append(agent)
    agent.start()
    client = services.s3_client()

    def objects():
        return [o for page in client.get_paginator("list_objects_v2").paginate(Bucket="multipart")
                for o in page.get("Contents", [])]

    def seqs():
        out = []
        for o in objects():
            body = client.get_object(Bucket="multipart", Key=o["Key"])["Body"].read()
            out.extend(json.loads(line)["seq"] for line in tron.read_gz_lines(body))
        return out

    tron.wait_until("every line archived", lambda: len(set(seqs())) >= lines, timeout=90, interval=2,
                    on_timeout=agent.tail)
    assert sorted(seqs()) == list(range(lines))
    multipart = [o for o in objects() if "-" in o["ETag"].strip('"')]
    assert multipart, "no multipart object among %s" % [(o["Key"], o["Size"], o["ETag"]) for o in objects()]
    assert all(o["Size"] > 5 << 20 for o in multipart)
    assert "tron_agent_multipart_uploads_total" in agent.metrics()
    print("multipart: %d objects, %d multipart (%s)" % (len(objects()), len(multipart),
                                                         [(o["Size"], o["ETag"]) for o in multipart]))
    assert agent.stop() == 0
