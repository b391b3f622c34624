"""Fixture workdirs for the report tests (written once per session)."""

import pytest

from tests.reports import fixtures


@pytest.fixture(scope="session")
def birds(tmp_path_factory):
    return fixtures.birds(tmp_path_factory.mktemp("report-birds") / "d")


@pytest.fixture(scope="session")
def sweep_root(tmp_path_factory, birds):
    root = tmp_path_factory.mktemp("report-sweep") / "sweep"
    fixtures.sweep_folder(root, birds)
    return root
