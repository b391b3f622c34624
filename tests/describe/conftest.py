"""Fixtures of the describe tests: a fake chat server on a free loopback port."""

import pytest

from tests.describe.fake_chat_server import FakeChatServer


@pytest.fixture
def server():
    with FakeChatServer() as s:
        yield s
