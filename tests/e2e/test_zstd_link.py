"""The relay link compressed by zstd (`compression = "zstd"`, CompressedPackedForward with
`"compressed": "zstd"`): the agent's chunks reach Kafka and GCS through tron-relay, and Fluent Bit
5.1.1's `in_forward` reads and acks them, as it does the default gzip level 1 chunks that ISA-L's
igzip compresses whole (skipped without ../shared); hostile zstd chunks at the relay's default
limits are refused while they decode, and memory stays bounded."""
import json
import os
import socket
import subprocess
import time

import msgpack
import pytest
import zstandard

import tron
from test_relay_abuse import KeepSending, counter, each_closed_after_sending, send_and_wait_ack
from test_relay_load import plaintext_relay

FLUENT_BIT = os.path.join(tron.ROOT, "..", "shared", "peers", "fluent-bit", "fluent-bit")


def write_seqs(path, first, n):
    with open(path, "a") as f:
        f.writelines(json.dumps({"seq": seq, "msg": "GET /item/%d 200 %s" % (seq % 977, "x" * (seq % 50))}) + "\n"
                     for seq in range(first, first + n))


def test_agent_chunks_compressed_by_zstd_reach_gcs_through_the_relay(services, certs, workroot, procs):
    work = os.path.join(workroot, "zstd-relay")
    relay, _sink, _, _ = tron.relay_to_gcs(services, certs, work, procs, "zstdlink", "zstdlink", 2,
                                           columns=[{"name": "seq", "source": "seq", "type": "INTEGER"}])
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + os.path.join(work, "s3"),
                            relay.config["listen"], certs)
    cfg["destinations"]["relay"]["compression"] = "zstd"
    del cfg["destinations"]["relay"]["batch"]  # the shipped 1 MiB chunks
    agent = tron.Proc("agent", "tron-agent", cfg, work)
    procs.append(agent)
    agent.start()
    total = 60_000
    write_seqs(os.path.join(logs, "a.log"), 0, total // 2)
    write_seqs(os.path.join(logs, "b.log"), total // 2, total // 2)

    def seqs():
        return {int(r[0]) for r in tron.gcs_csv_rows(services, "zstdlink", "w/zstdlink/")}

    tron.wait_until("every line in GCS", lambda: len(seqs()) >= total, timeout=120, interval=2, on_timeout=agent.tail)
    assert seqs() == set(range(total))
    sent = agent.metric("tron_agent_records_sent_total", destination="relay")
    received = relay.metric("tron_relay_records_received_total")
    rejected = relay.metric("tron_relay_frames_rejected_total") or 0
    print("zstd link: %d lines through the relay to GCS; agent sent %s records, relay received %s; "
          "frames rejected %d" % (total, sent, received, rejected))
    assert sent == total and received >= total and rejected == 0
    assert agent.stop() == 0


@pytest.mark.skipif(not os.path.exists(FLUENT_BIT), reason="no Fluent Bit at %s (../shared absent)" % FLUENT_BIT)
@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_fluent_bit_in_forward_reads_and_acks_the_agents_chunks(compression, certs, workroot, procs):
    work = os.path.join(workroot, "%s-fluent-bit" % compression)
    out = os.path.join(work, "out")
    os.makedirs(out)
    port = tron.servers.free_port()
    conf = os.path.join(work, "fluent-bit.conf")
    with open(conf, "w") as f:
        f.write("[SERVICE]\n    flush 1\n    log_level info\n"
                "[INPUT]\n    Name forward\n    Listen 127.0.0.1\n    Port %d\n"
                "[OUTPUT]\n    Name file\n    Match *\n    Path %s\n    Format plain\n" % (port, out))
    receiver = subprocess.Popen([FLUENT_BIT, "-c", conf], stdout=open(os.path.join(work, "fluent-bit.log"), "wb"),
                                stderr=subprocess.STDOUT)
    try:
        tron.wait_until("Fluent Bit listening", lambda: port_open(port), timeout=20, interval=0.2)
        logs = os.path.join(work, "logs")
        os.makedirs(logs)
        cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + os.path.join(work, "s3"),
                                "127.0.0.1:%d" % port, certs)
        del cfg["destinations"]["s3"]
        relay_cfg = cfg["destinations"]["relay"]
        relay_cfg.update(compression=compression, plaintext=True, watermark_interval="0s")
        if compression == "gzip":
            assert relay_cfg.get("gzip_level", 1) == 1  # the shipped level: igzip's whole-chunk members
        for key in ("tls_ca", "tls_server_name", "batch"):
            relay_cfg.pop(key, None)
        agent = tron.Proc("agent", "tron-agent", cfg, work)
        procs.append(agent)
        agent.start()
        total = 20_000
        write_seqs(os.path.join(logs, "a.log"), 0, total)

        def received():
            got = set()
            for name in os.listdir(out):
                with open(os.path.join(out, name)) as f:
                    got.update(json.loads(line)["seq"] for line in f if line.strip())
            return got

        tron.wait_until("every line at Fluent Bit", lambda: len(received()) >= total, timeout=60, interval=1,
                        on_timeout=agent.tail)
        tron.wait_until("every chunk acked by Fluent Bit",
                        lambda: agent.metric("tron_agent_records_sent_total", destination="relay") == total,
                        timeout=30, interval=0.5, on_timeout=agent.tail)
        assert received() == set(range(total))
        print("%s link to Fluent Bit 5.1.1 in_forward: %d lines received and acked" % (compression, total))
        assert agent.stop() == 0
    finally:
        receiver.terminate()
        receiver.wait(30)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def zstd_bombs():
    """Three small zstd chunks that decode far past the default 32 MiB `max_decompressed_bytes`
    or into tens of millions of MessagePack elements: a streamed frame of 256 MiB that does not
    say its size, a frame that says it (refused from its header), and 30 million one-byte map
    pairs that fit the size limit but not the element limit."""
    entry = msgpack.packb([1795300000, {"m": "0" * (1 << 20)}])
    streamed = zstandard.ZstdCompressor(level=19).compressobj()
    body = b"".join(streamed.compress(entry) for _ in range(256)) + streamed.flush()
    sized = zstandard.ZstdCompressor(level=19).compress(entry * 64)
    pairs = 15_000_000
    elements = bytearray(b"\x92\xd7\x00" + (1795300000).to_bytes(4, "big") + b"\x00\x00\x00\x00")
    elements += b"\xdf" + pairs.to_bytes(4, "big") + b"\x01\x02" * pairs
    dense = zstandard.ZstdCompressor(level=19).compress(bytes(elements))
    frames = [msgpack.packb(["bomb", packed, {"compressed": "zstd", "chunk": "boom"}], use_bin_type=True)
              for packed in (body, sized, dense)]
    assert all(len(f) < (1 << 20) for f in frames), [len(f) for f in frames]
    return frames


def test_zstd_bombs_at_default_limits_are_refused_and_memory_stays_bounded(services, certs, workroot, procs):
    """A relay at default limits: 96 connections, four times over, each send one of `zstd_bombs()`;
    every one is closed and counted, relay RSS stays under 256 MiB, and a client sending small
    chunks meanwhile keeps getting acks."""
    relay, host, port = plaintext_relay(services, certs, os.path.join(workroot, "zstd-bombs"), "zstdbombs")
    procs.append(relay)
    relay.start()
    good = socket.create_connection((host, port), timeout=10)
    assert send_and_wait_ack(good, "g0") == {"ack": "g0"}
    sender = KeepSending(good, "g", 0.2)
    frames = zstd_bombs()
    peak = 0.0
    try:
        for _ in range(4):
            hostile = [socket.create_connection((host, port), timeout=10) for _ in range(8 * len(frames))]
            each_closed_after_sending(hostile, frames, timeout=60)
            peak = max(peak, relay.peak_rss_mib())
        tron.wait_until("a few more acks for the good client", lambda: len(sender.acked) >= 5, timeout=30)
    finally:
        sender.stop()
    too_large = counter(relay, "tron_relay_frames_rejected_total", "decompressed_too_large")
    too_many = counter(relay, "tron_relay_frames_rejected_total", "too_many_elements")
    print("zstd bombs: frames of %s bytes x 96 connections at default limits; refused as too large %d, "
          "too many elements %d; relay peak RSS %.0f MiB; good client acks meanwhile: %d"
          % ([len(f) for f in frames], too_large, too_many, peak, len(sender.acked)))
    assert too_large >= 64 and too_many >= 32
    assert peak <= 256, "relay peak RSS %.0f MiB" % peak
    assert not sender.failures and sender.acked, (len(sender.acked), sender.failures)
