"""Multiline records (stack traces): continuation lines join the record before, even when they
are written after a pause shorter than the flush time-out; the last record is shipped once the
file stays quiet for the flush time-out; a restart does not split a record."""
import os
import time

import test_agent_bad_input as bad
import tron


def test_stack_traces_are_one_record_each(workroot, certs, procs):
    work = os.path.join(workroot, "multiline")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    archive = os.path.join(work, "s3")
    cfg = tron.agent_config(work, os.path.join(logs, "*.log"), "file://" + archive, None, certs)
    cfg["sources"][0].update(parser="raw", multiline={"start": r"^\d{4}-\d\d-\d\d ", "flush_timeout": "1500ms"})
    cfg["destinations"]["s3"]["batch"]["max_age"] = "200ms"
    agent = tron.Proc("agent", "tron-agent", cfg, work)
    procs.append(agent)
    agent.start()
    path = os.path.join(logs, "app.log")

    def record(i, frames):
        return "2026-11-22 10:00:%02d ERROR boom %d\n" % (i % 60, i) + "".join("\tat f%d()\n" % j for j in range(frames))

    expected = []
    with open(path, "a") as f:
        for i in range(200):
            text = record(i, i % 5)
            expected.append(text.rstrip("\n"))
            f.write(text)
        f.flush()
        # A record whose continuation arrives 0.6 s later (under the 1.5 s flush time-out).
        f.write("2026-11-22 10:01:00 ERROR slow\n")
        f.flush()
        time.sleep(0.6)
        f.write("\tat late()\n\tat later()\n")
        f.flush()
        expected.append("2026-11-22 10:01:00 ERROR slow\n\tat late()\n\tat later()")
    agent.kill()  # a crash while the last record is held back: it must not come back split
    agent.start()
    with open(path, "a") as f:
        f.write("\tat after_restart()\n")
    expected[-1] += "\n\tat after_restart()"

    def shipped():
        return [r["message"] for r in bad.archived(archive)]

    began = time.time()
    tron.wait_until("every record, the last after the flush time-out",
                    lambda: len(shipped()) >= len(expected) and shipped()[-1].endswith("after_restart()"),
                    timeout=30, interval=0.3, on_timeout=lambda: "%s\n%s" % (shipped()[-3:], agent.tail()))
    assert time.time() - began >= 1.0, "the held record was shipped before the flush time-out"
    got = shipped()
    assert sorted(set(got)) == sorted(expected), [g for g in got if g not in expected][:3]
    assert agent.stop() == 0
