"""`tempflow-fast demo-ops` runs and reports the backend it used."""

from tempflow_fast.ops import demo


def test_demo_runs_on_the_reference_backend(capsys):
    assert demo.main(["--backend", "torch", "--n", "2", "--k", "3", "--tokens", "16", "--channels", "4"]) == 0
    out = capsys.readouterr().out
    assert "backend: torch on cpu" in out
    assert "fused_flow_grpo_loss: loss" in out and "dL/dmean norm" in out
