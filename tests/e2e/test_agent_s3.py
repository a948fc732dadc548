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


def archive_with(services, certs, workroot, procs, name, env_extra, credentials_in_env=True, **s3_options):
    """An agent archiving one small file to s3://{name}/a with `s3_options`; returns it and the client."""
    work = os.path.join(workroot, name)
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    services.create_s3_bucket(name)
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "s3://%s/a" % name, None, certs,
                            s3_endpoint=services.s3_endpoint)
    cfg["destinations"]["s3"].update(s3_options)
    cfg["destinations"]["s3"]["batch"].update(max_age="1s")
    with open(os.path.join(logs, "app.log"), "w") as f:
        for i in range(1000):
            f.write(json.dumps({"seq": i}) + "\n")
    env = dict(tron.servers.S3_CREDENTIALS) if credentials_in_env else {}
    env.update(env_extra)
    agent = tron.Proc("agent", "tron-agent", cfg, work, env=env)
    procs.append(agent)
    agent.start()
    return agent, services.s3_client()


def test_objects_carry_sse_kms_and_storage_class_under_an_assumed_role(services, certs, workroot, procs):
    # STS is moto too (the SDK's per-service endpoint variable), so AssumeRole is a real call.
    agent, client = archive_with(
        services, certs, workroot, procs, "sse-kms", {"AWS_ENDPOINT_URL_STS": services.s3_endpoint},
        sse="aws:kms", sse_kms_key_id="arn:aws:kms:us-east-1:123456789012:key/tron-archive",
        storage_class="STANDARD_IA", role_arn="arn:aws:iam::123456789012:role/tron-archive",
        checksums="when_required")

    def listed():
        return client.list_objects_v2(Bucket="sse-kms").get("Contents", [])

    tron.wait_until("the archive object", listed, timeout=60, on_timeout=agent.tail)
    head = client.head_object(Bucket="sse-kms", Key=listed()[0]["Key"])
    assert head["ServerSideEncryption"] == "aws:kms", head
    assert head["SSEKMSKeyId"].endswith("tron-archive"), head
    assert head["StorageClass"] == "STANDARD_IA", head
    body = client.get_object(Bucket="sse-kms", Key=listed()[0]["Key"])["Body"].read()
    assert sorted(json.loads(line)["seq"] for line in tron.read_gz_lines(body)) == list(range(1000))


def test_an_unreachable_sts_fails_uploads_so_the_role_is_really_used(services, certs, workroot, procs):
    closed = "http://127.0.0.1:%d" % tron.servers.free_port()
    agent, client = archive_with(services, certs, workroot, procs, "sts-down", {"AWS_ENDPOINT_URL_STS": closed},
                                 role_arn="arn:aws:iam::123456789012:role/tron-archive")

    def failing():
        return (tron.metric(agent.metrics(), "tron_agent_send_retries_total", destination="s3") or 0) > 0

    tron.wait_until("S3 uploads failing for want of the role's credentials", failing, timeout=90,
                    on_timeout=agent.tail)
    assert client.list_objects_v2(Bucket="sts-down").get("KeyCount", 0) == 0


def test_credentials_come_from_the_named_profile(services, certs, workroot, procs, tmp_path):
    # Only the profile has credentials: no AWS_* keys in the environment, no default profile.
    (tmp_path / "config").write_text("[profile archive]\nregion = us-east-1\n")
    (tmp_path / "credentials").write_text("[archive]\naws_access_key_id = test\naws_secret_access_key = test\n")
    env = {"AWS_CONFIG_FILE": str(tmp_path / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials")}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION"):
        assert var not in os.environ, var
    agent, client = archive_with(services, certs, workroot, procs, "by-profile", env, credentials_in_env=False,
                                 profile="archive")
    tron.wait_until("the archive object, signed with the profile's keys",
                    lambda: client.list_objects_v2(Bucket="by-profile").get("KeyCount", 0) > 0, timeout=60,
                    on_timeout=agent.tail)
