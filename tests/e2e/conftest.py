import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "services"))

import certs as certs_mod  # noqa: E402
import servers  # noqa: E402
import tron  # noqa: E402


@pytest.fixture(scope="session")
def workroot(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tron-e2e"))


@pytest.fixture(scope="session")
def services(workroot):
    """Kafka (Tansu, in memory), moto S3 and fake-gcs-server, once for the whole suite."""
    svc = servers.Services(os.path.join(workroot, "services")).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def certs(workroot):
    return certs_mod.make(os.path.join(workroot, "certs"))


@pytest.fixture
def procs():
    """Processes a test starts; whatever is still running at the end is killed."""
    started = []
    yield started
    for p in started:
        p.kill()
