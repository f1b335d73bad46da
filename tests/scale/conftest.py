import pytest
import pytest_twisted

from engines import Engines


@pytest.fixture
def engines():
    """Start engines in this process with C{engines.start(modules)}; all stopped after."""
    running = Engines()
    yield running
    pytest_twisted.blockon(running.stop_all())
