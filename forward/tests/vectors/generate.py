"""Writes Forward-protocol test vectors with tools nobody on this project wrote: the PyPI
`msgpack` packer and the PyPI `fluent-logger` client (captured off a real socket).

Each vector is NAME.msgpack (the bytes on the wire) and NAME.json (what a correct decoder must
produce). Run with the project venv:  .venv/bin/python forward/tests/vectors/generate.py
"""
import gzip
import json
import os
import socket
import struct
import threading

import msgpack
from fluent import sender

HERE = os.path.dirname(os.path.abspath(__file__))


def event_time(sec, nsec):
    return msgpack.ExtType(0, struct.pack(">II", sec, nsec))


def write(name, wire, expected):
    with open(os.path.join(HERE, name + ".msgpack"), "wb") as f:
        f.write(wire)
    with open(os.path.join(HERE, name + ".json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


def entry(time_ns, record, metadata=None):
    e = {"time_ns": time_ns, "record": record}
    if metadata is not None:
        e["metadata"] = metadata
    return e


def packed(entries, **kw):
    return b"".join(msgpack.packb(e, **kw) for e in entries)


def capture_fluent_logger(emit):
    """Runs a one-shot TCP server, lets fluent-logger send to it, returns the bytes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = bytearray()

    def serve():
        conn, _ = srv.accept()
        while True:
            data = conn.recv(65536)
            if not data:
                break
            got.extend(data)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    emit(srv.getsockname()[1])
    t.join(5)
    srv.close()
    return bytes(got)


def main():
    rec = {"message": "GET /index.html 200", "status": 200, "ms": 1.5, "ok": True, "none": None}

    write("message_integer_time",
          msgpack.packb(["nginx.access", 1700000000, rec]),
          {"tag": "nginx.access", "mode": "Message", "entries": [entry(1700000000 * 10**9, rec)]})

    write("message_options_chunk",
          msgpack.packb(["app", 1700000001, {"a": 1}, {"chunk": "Y2h1bmstMQ==", "size": 1}]),
          {"tag": "app", "mode": "Message", "chunk": "Y2h1bmstMQ==", "entries": [entry(1700000001 * 10**9, {"a": 1})]})

    write("forward_mixed_times",
          msgpack.packb(["app.forward", [[1700000002, {"n": 1}], [event_time(1700000003, 5), {"n": 2}]],
                         {"chunk": "fwd-1", "size": 2}]),
          {"tag": "app.forward", "mode": "Forward", "chunk": "fwd-1",
           "entries": [entry(1700000002 * 10**9, {"n": 1}), entry(1700000003 * 10**9 + 5, {"n": 2})]})

    es = [[event_time(1700000004, 1), {"k": "v1"}], [event_time(1700000004, 2), {"k": "v2"}]]
    write("packed_forward_bin",
          msgpack.packb(["app.packed", packed(es), {"chunk": "p-bin"}], use_bin_type=True),
          {"tag": "app.packed", "mode": "PackedForward", "chunk": "p-bin",
           "entries": [entry(1700000004 * 10**9 + 1, {"k": "v1"}), entry(1700000004 * 10**9 + 2, {"k": "v2"})]})

    # Old clients send the packed entries as a raw/str family value.
    write("packed_forward_str",
          msgpack.packb(["app.packed", packed(es), {"chunk": "p-str"}], use_bin_type=False),
          {"tag": "app.packed", "mode": "PackedForward", "chunk": "p-str",
           "entries": [entry(1700000004 * 10**9 + 1, {"k": "v1"}), entry(1700000004 * 10**9 + 2, {"k": "v2"})]})

    # fluent-bit may send several gzip members in one chunk.
    m1 = gzip.compress(packed(es[:1]))
    m2 = gzip.compress(packed(es[1:]))
    write("compressed_two_members",
          msgpack.packb(["app.gz", m1 + m2, {"chunk": "gz-2", "size": 2, "compressed": "gzip"}], use_bin_type=True),
          {"tag": "app.gz", "mode": "CompressedPackedForward", "chunk": "gz-2",
           "entries": [entry(1700000004 * 10**9 + 1, {"k": "v1"}), entry(1700000004 * 10**9 + 2, {"k": "v2"})]})

    # EventTime as ext8 (0xc7 0x08 0x00 ...) instead of fixext8: hand-built from the spec.
    ext8 = b"\xc7\x08\x00" + struct.pack(">II", 1700000005, 7)
    wire = b"\x93" + msgpack.packb("app.ext8") + ext8 + msgpack.packb({"e": 8})
    write("message_ext8_time", wire,
          {"tag": "app.ext8", "mode": "Message", "entries": [entry(1700000005 * 10**9 + 7, {"e": 8})]})

    # Newer fluent-bit: [[EventTime, {metadata}], record].
    meta = [[[event_time(1700000006, 0), {"otel": "x"}], {"log": "with metadata"}]]
    write("forward_metadata_time",
          msgpack.packb(["fb.meta", meta, {"chunk": "m-1"}]),
          {"tag": "fb.meta", "mode": "Forward", "chunk": "m-1",
           # The metadata is read past, not carried: Kafka gets the record (and the time).
           "entries": [entry(1700000006 * 10**9, {"log": "with metadata"})]})

    write("heartbeat", msgpack.packb(None), {"heartbeat": True})

    def emit(port):
        s = sender.FluentSender("py", host="127.0.0.1", port=port, nanosecond_precision=True)
        s.emit_with_time("client", sender.EventTime(1700000007.25), {"from": "fluent-logger", "utf8": "h\u00e9llo"})
        s.close()

    write("fluent_logger_python", capture_fluent_logger(emit),
          {"tag": "py.client", "mode": "Message",
           "entries": [entry(1700000007 * 10**9 + 250000000, {"from": "fluent-logger", "utf8": "h\u00e9llo"})]})


if __name__ == "__main__":
    main()
