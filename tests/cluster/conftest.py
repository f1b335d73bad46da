import pytest
import pytest_twisted

from cluster_helpers import Cluster


@pytest.fixture
def cluster():
    """Engines in this process sharing one MemoryDirectory registry; all stopped after."""
    running = Cluster()
    yield running
    pytest_twisted.blockon(running.stop_all())
