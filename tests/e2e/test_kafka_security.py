"""Kafka behind TLS with client certificates, as managed clusters are run: the relay produces and
the sink consumes through a real TLS server (stunnel, OpenSSL) in front of Tansu, with zstd, and
both refuse to call Kafka healthy when the TLS handshake fails. Also: --check-config builds the
librdkafka configuration and names the key librdkafka refuses.

SASL against a real broker, as far as Tansu 0.6 goes: its `--authentication` listener speaks
SaslHandshake and SCRAM, but no user can be given to it here (docs/kafka-security.md lists what was
tried), so what runs is the refusal: relay and sink negotiate SCRAM-SHA-256 with Tansu, are told
`unknown-user`, and say so on /health. A successful SASL login is covered only by unit tests
(librdkafka accepts sasl_ssl + SCRAM/PLAIN configurations)."""
import json
import os
import subprocess

import pytest
from fluent import sender

import servers
import tron

RECORD_COLUMNS = [
    {"name": "time", "source": "@time", "type": "TIMESTAMP"},
    {"name": "tag", "source": "@tag", "type": "STRING"},
    {"name": "record", "source": "@record", "type": "JSON"},
]


@pytest.fixture(scope="module")
def tls_kafka(workroot, certs):
    kafka = servers.TlsKafka(os.path.join(workroot, "tls-kafka"), certs).start()
    yield kafka
    kafka.stop()




def test_relay_and_sink_over_mutual_tls_kafka_with_zstd(services, tls_kafka, certs, workroot, procs):
    work = os.path.join(workroot, "kafka-tls")
    os.makedirs(work)
    tls_kafka.create_topic("secure", 2)
    services.create_gcs_bucket("secure-out")
    kafka = dict(tron.relay_config(work, certs, tls_kafka.brokers)["kafka"], default_topic="secure",
                 compression="zstd", properties=tls_kafka.client_properties())
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, tls_kafka.brokers, plaintext=True,
                                                               kafka=kafka), work)
    sink_cfg = tron.sink_config(work, tls_kafka.brokers, "gs://secure-out/w", gcs_endpoint=services.gcs_endpoint,
                                topic="secure", group="secure")
    sink_cfg["kafka"]["properties"] = tls_kafka.client_properties()
    sink_cfg["output"]["columns"] = RECORD_COLUMNS
    sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work)
    procs.extend([relay, sink])
    relay.start(), sink.start()

    tron.wait_until("relay healthy over TLS Kafka", lambda: relay.health()[0] == 200, timeout=60,
                    on_timeout=lambda: relay.tail())
    host, port = relay.config["listen"].rsplit(":", 1)
    log = sender.FluentSender("tls", host=host, port=int(port))
    for i in range(500):
        assert log.emit("evt", {"i": i, "text": "over TLS"}), log.last_error
    log.close()

    def arrived():
        return len(tron.gcs_csv_rows(services, "secure-out", "w/secure/")) >= 500

    tron.wait_until("500 records through TLS Kafka", arrived, timeout=120, interval=1,
                    on_timeout=lambda: relay.tail() + sink.tail())
    rows = tron.gcs_csv_rows(services, "secure-out", "w/secure/")
    assert sorted(json.loads(r[2])["i"] for r in rows) == list(range(500))
    assert sink.health()[0] == 200, sink.health()


def test_kafka_that_refuses_our_tls_client_turns_health_503(services, tls_kafka, certs, workroot, procs):
    work = os.path.join(workroot, "kafka-tls-refused")
    os.makedirs(work)
    # No client certificate: the TLS server refuses the handshake.
    kafka = dict(tron.relay_config(work, certs, tls_kafka.brokers)["kafka"], default_topic="secure",
                 properties=tls_kafka.client_properties(client_cert=False))
    relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, tls_kafka.brokers, plaintext=True,
                                                               kafka=kafka), work)
    procs.append(relay)
    relay.start()

    def unhealthy():
        status, body = relay.health()
        return status == 503 and "kafka" in json.dumps(body)

    tron.wait_until("relay /health 503 naming kafka", unhealthy, timeout=90, on_timeout=lambda: relay.tail())


def test_sasl_scram_is_negotiated_with_a_real_broker_and_a_refused_login_turns_health_503(
        services, certs, workroot, procs):
    work = os.path.join(workroot, "kafka-sasl")
    os.makedirs(work)
    port = servers.free_port()
    url = "tcp://127.0.0.1:%d" % port
    broker = servers.Server("tansu-sasl", [servers.TANSU, "broker", "--listener-url", url, "--advertised-listener-url",
                                           url, "--storage-engine", "memory://tansu/", "--authentication"],
                            work, {"RUST_LOG": "warn"}).start()
    try:
        servers.wait_for("Tansu with --authentication", lambda: servers.tcp_open(port), proc=broker.proc,
                         log=broker.log)
        password = os.path.join(work, "kafka-password")
        with open(password, "w") as f:
            f.write("s3cret\n")
        props = {"security.protocol": "sasl_plaintext", "sasl.mechanism": "SCRAM-SHA-256",
                 "sasl.username": "tron", "sasl.password_file": password}
        brokers = "127.0.0.1:%d" % port
        kafka = dict(tron.relay_config(work, certs, brokers)["kafka"], default_topic="secure", properties=props)
        relay = tron.Proc("relay", "tron-relay", tron.relay_config(work, certs, brokers, plaintext=True, kafka=kafka),
                          work)
        sink_cfg = tron.sink_config(work, brokers, "gs://secure-out/sasl", gcs_endpoint=services.gcs_endpoint,
                                    topic="secure", group="sasl")
        sink_cfg["kafka"]["properties"] = props
        sink = tron.Proc("sink", "tron-sink-secor", sink_cfg, work)
        procs.extend([relay, sink])
        relay.start(), sink.start()

        for proc in (relay, sink):
            def refused():
                status, body = proc.health()
                return status == 503 and "kafka" in json.dumps(body)

            tron.wait_until("%s /health 503 naming kafka" % proc.name, refused, timeout=90,
                            on_timeout=lambda: proc.tail() + open(broker.log).read()[-2000:])
            # The refusal came from the broker's SCRAM step, not from a connection that failed.
            tron.wait_until("%s logs the broker's SCRAM refusal" % proc.name, lambda: "unknown-user" in proc.tail(20000),
                            timeout=30, on_timeout=lambda: proc.tail())
    finally:
        broker.stop()


def check_config(binary, cfg, work):
    path = os.path.join(work, binary + ".toml")
    with open(path, "w") as f:
        f.write(tron.to_toml(cfg))
    return subprocess.run([os.path.join(tron.BIN, binary), "--config", path, "--check-config"],
                          capture_output=True, text=True)


def test_check_config_builds_the_kafka_client_and_names_the_refused_key(certs, workroot):
    work = os.path.join(workroot, "kafka-check-config")
    os.makedirs(work)
    brokers = "127.0.0.1:9"
    relay = tron.relay_config(work, certs, brokers, plaintext=True)
    relay["kafka"].update(compression="zstd", properties={
        "security.protocol": "sasl_ssl", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "tron",
        "sasl.password": "x", "ssl.ca.location": certs["ca"]})
    out = check_config("tron-relay", relay, work)
    assert out.returncode == 0, out.stderr

    relay["kafka"]["properties"]["ssl.ca.location"] = "/nonexistent/ca.pem"
    out = check_config("tron-relay", relay, work)
    assert out.returncode != 0
    assert 'key `kafka.properties."ssl.ca.location"`' in out.stderr, out.stderr

    sink = tron.sink_config(work, brokers, "file://" + work)
    sink["kafka"]["properties"] = {"security.protocol": "carrier_pigeon"}
    out = check_config("tron-sink-secor", sink, work)
    assert out.returncode != 0
    assert 'key `kafka.properties."security.protocol"`' in out.stderr and "carrier_pigeon" in out.stderr, out.stderr

    with open(os.path.join(work, "kafka-password"), "w") as f:
        f.write("s3cret\n")
    sink["kafka"]["properties"] = {"security.protocol": "sasl_plaintext", "sasl.mechanism": "PLAIN",
                                   "sasl.username": "tron",
                                   "sasl.password_file": os.path.join(work, "kafka-password")}
    out = check_config("tron-sink-secor", sink, work)
    assert out.returncode == 0, out.stderr
