"""Hostile or broken clients are refused, logged with their address and counted, while a
well-behaved client on the same relay keeps getting its chunks acked."""
import gzip
import os
import socket
import ssl
import time

import msgpack

import certs as certs_mod
import tron


def tls_client(certs, host, port, cert=None):
    ctx = ssl.create_default_context(cafile=certs["ca"])
    if cert:
        ctx.load_cert_chain(cert[0], cert[1])
    raw = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def send_and_wait_ack(sock, chunk_id):
    frame = msgpack.packb(["good.client", [[1795300000, {"ok": True}]], {"chunk": chunk_id}])
    sock.sendall(frame)
    unpacker = msgpack.Unpacker(raw=False)
    deadline = time.time() + 20
    while time.time() < deadline:
        data = sock.recv(4096)
        if not data:
            return None
        unpacker.feed(data)
        for obj in unpacker:
            return obj
    return None


def closed_by_peer(sock, timeout=10):
    """True once the relay closes the connection (a TLS alert before the close is fine)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except socket.timeout:
        return False
    except (ConnectionResetError, ssl.SSLError, OSError):
        return True


def counter(relay, name, reason):
    for line in relay.metrics().splitlines():
        if line.startswith(name) and 'reason="%s"' % reason in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_abusive_clients_are_refused_and_counted_while_good_ones_are_served(services, certs, workroot, procs):
    work = os.path.join(workroot, "abuse")
    os.makedirs(work)
    services.create_topic("abuse", 1)
    cfg = tron.relay_config(work, certs, services.kafka_brokers, topic="abuse")
    cfg["tls"]["client_ca"] = certs["ca"]
    cfg["limits"] = {"max_frame_bytes": 1 << 20, "max_decompressed_bytes": 4 << 20, "max_inflight_bytes": 8 << 20,
                     "handshake_timeout": "2s"}
    relay = tron.Proc("relay", "tron-relay", cfg, work)
    procs.append(relay)
    relay.start()
    host, port = cfg["listen"].rsplit(":", 1)
    port = int(port)
    good_cert = (certs["client_cert"], certs["client_key"])
    good = tls_client(certs, host, port, good_cert)
    assert send_and_wait_ack(good, "before") == {"ack": "before"}

    # 1. Plaintext Forward on the TLS port.
    raw = socket.create_connection((host, port), timeout=10)
    raw.sendall(msgpack.packb(["plain", 1795300000, {"a": 1}]))
    assert closed_by_peer(raw)

    # 2. A client certificate from another CA (mutual TLS).
    other = certs_mod.make(os.path.join(work, "other-ca"), name="intruder")
    try:
        s = tls_client(certs, host, port, (other["client_cert"], other["client_key"]))
        assert closed_by_peer(s)
    except (ssl.SSLError, ConnectionResetError, OSError):
        pass  # refused during the handshake

    # 3. A gzip bomb: 100 MiB of entries compressed to ~100 KiB, over the 4 MiB decompressed limit.
    entries = msgpack.packb([1795300000, {"m": "0" * (1 << 20)}]) * 100
    bomb = msgpack.packb(["bomb", gzip.compress(entries, 9), {"chunk": "boom", "compressed": "gzip"}])
    assert len(bomb) < (1 << 20)
    s = tls_client(certs, host, port, good_cert)
    s.sendall(bomb)
    assert closed_by_peer(s)

    # 4. Garbage MessagePack.
    s = tls_client(certs, host, port, good_cert)
    s.sendall(b"\xc1\xc1\xc1\xc1")
    assert closed_by_peer(s)

    # 5. A frame over max_frame_bytes, refused from its header alone.
    s = tls_client(certs, host, port, good_cert)
    s.sendall(b"\x93\xa1t\xc6\x10\x00\x00\x00")  # [ "t", bin32 of 256 MiB ...
    assert closed_by_peer(s)

    time.sleep(1)
    assert counter(relay, "tron_relay_connections_refused_total", "tls") >= 2
    assert counter(relay, "tron_relay_frames_rejected_total", "decompressed_too_large") == 1
    assert counter(relay, "tron_relay_frames_rejected_total", "invalid_msgpack") == 1
    assert counter(relay, "tron_relay_frames_rejected_total", "frame_too_large") == 1
    log = relay.tail(20000)
    assert "max_decompressed_bytes=4194304" in log and "peer=127.0.0.1:" in log
    # The well-behaved client was never disturbed.
    assert send_and_wait_ack(good, "after") == {"ack": "after"}
    good.close()
