import pytest

from executors.agent.settings import is_loopback_host
from mlynar_events.config import is_loopback as config_is_loopback
from mlynar_events.netaddr import is_loopback


@pytest.mark.parametrize("host,expected", [
    ("127.0.0.1", True),
    ("127.5.5.5", True),
    ("::1", True),
    ("[::1]", True),
    ("localhost", True),
    ("0.0.0.0", False),
    ("10.0.0.1", False),
    ("example.com", False),
    ("", False),
])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_old_names_are_the_same_rule():
    assert config_is_loopback is is_loopback
    assert is_loopback_host is is_loopback
