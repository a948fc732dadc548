"""A daemon that cannot start (here: its metrics port is taken) exits 1 with one error line that
names the setting, and no panic. Before, dropping the runtime after the error cancelled tasks that
other worker threads were polling; they panicked on their timers ("A Tokio 1.x context was found,
but it is being shutdown") in 27 of 40 agent starts, a backtrace after the real error (seen in CI
when two agents of one test were given the same port)."""
import os
import socket
import subprocess

import pytest

import servers
import tron

STARTS = 10  # the old agent panicked in 2 of 3 starts: 10 clean starts do not happen by luck


def held_port():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((servers.HOST, servers.free_port()))
    s.listen()
    return s


def configs(name, work, services, certs, port):
    if name == "tron-agent":
        logs = os.path.join(work, "logs")
        os.makedirs(logs, exist_ok=True)
        with open(os.path.join(logs, "app.log"), "w") as f:
            f.writelines('{"seq": %d}\n' % n for n in range(1000))
        # Both destinations and a relay nobody listens on: every loop of the agent is running
        # when the metrics port is bound.
        cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + os.path.join(work, "s3"),
                                "127.0.0.1:%d" % servers.free_port(), certs)
    elif name == "tron-relay":
        cfg = tron.relay_config(work, certs, services.kafka_brokers, topic="startup-errors")
    else:
        cfg = tron.sink_config(work, services.kafka_brokers, "gs://startup-errors/w",
                               gcs_endpoint=services.gcs_endpoint, topic="startup-errors", group="startup-errors")
    cfg["metrics_listen"] = "127.0.0.1:%d" % port
    return cfg


@pytest.mark.parametrize("name", ["tron-agent", "tron-relay", "tron-sink-secor"])
def test_a_taken_metrics_port_ends_the_daemon_with_one_clear_error_and_no_panic(name, services, certs, workroot):
    work = os.path.join(workroot, "startup-errors-" + name)
    os.makedirs(work)
    holder = held_port()
    port = holder.getsockname()[1]
    try:
        proc = tron.Proc(name, name, configs(name, work, services, certs, port), work)
        for _ in range(STARTS):
            run = subprocess.run([proc.binary, "--config", proc.config_path], capture_output=True, text=True,
                                 env=proc.env, timeout=60)
            out = run.stdout + run.stderr
            assert run.returncode == 1, out[-3000:]
            assert "binding metrics_listen = 127.0.0.1:%d" % port in out, out[-3000:]
            assert "panicked" not in out, out[-3000:]
    finally:
        holder.close()
