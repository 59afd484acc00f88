import pytest

from .runs import forbid_model_load


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test when anything loads a model: the check under test must come before."""
    forbid_model_load(monkeypatch)
