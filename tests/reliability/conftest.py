import pytest


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test when anything loads a model: the check under test must come before."""
    from tempflow_fast.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad value was refused")

    monkeypatch.setattr(loading, "load_adapter", refuse)
