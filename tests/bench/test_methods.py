"""bench/methods.py (issue 8) on a tiny random model: every method runs in --quick settings and the report is
written; adaptive bifurcation allocates in proportion to the running spread with a floor and resumes exactly."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tempflow_fast.algorithms.tempflow import TempFlowGRPO
from tempflow_fast.config import load_config
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.training.train_config import Config
from tempflow_fast.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32)


def _load_methods():
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "bench" / "methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


methods = _load_methods()


class BrightnessReward:
    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3)).float()


def fake_eval(model):
    """A deterministic stand-in for the shapes eval: depends on the weights, two categories."""
    s = float(sum(p.detach().double().abs().sum() for p in model.module.parameters()))
    a, b = (s * 1e3) % 1.0, (s * 1e4) % 1.0
    return {"counting": {"accuracy": a}, "position": {"accuracy": b}, "overall": {"accuracy": (a + b) / 2}}


def small_model():
    return new_model(seed=0, transformer_config=SMALL)


TEST_OVERRIDES = ["train.learning_rate=1e-3", "train.inner_epochs=1", "stepwise.group_size=3"]


def test_quick_runs_every_method_and_writes_the_report(tmp_path):
    out = tmp_path / "grid"
    kw = dict(methods=list(methods.METHODS), seeds=[0], iterations=2, eval_every=1, quick=True, extra=TEST_OVERRIDES,
              model_factory=small_model, reward=BrightnessReward(), eval_fn=fake_eval, log=lambda *_: None)
    text = methods.run_grid(out, command="python bench/methods.py --quick", **kw)
    for name, (label, _, _) in methods.METHODS.items():
        rows = [json.loads(l) for l in (out / "runs" / name / "seed0" / "evals.jsonl").read_text().splitlines()]
        n = 2 * methods.ITERATION_SCALE.get(name, 1)  # Flow-GRPO and Stepwise: 3x, for equal model calls
        assert [r["iteration"] for r in rows] == list(range(n + 1)), name
        assert rows[0]["nfe"] == 0 and rows[n]["nfe"] > rows[1]["nfe"] > 0
        assert set(rows[0]["categories"]) == {"counting", "position"}
        assert rows[-1]["machine"]["calibration_ms"] > 0 and rows[-1]["machine"]["threads"] >= 1
        assert (out / "runs" / name / "seed0" / "summary.json").exists()
        assert label in text
    assert "vs model calls" in text and "ratio to Flow-GRPO" in text and "| Flow-GRPO |" in text
    assert "## By category at the last eval point" in text and "| method | iteration | counting | position |" in text
    assert "## Headline: model calls to reach the target accuracy" in text
    n = len(methods.METHODS)
    assert f"Machine records (a fixed CPU workload timed at each run's start, bench/methods.py machine_record): " \
           f"{n} of {n} runs carry one, on 1 host/CPU pair, calibration " in text
    assert (out / "report.md").read_text() == text
    assert (out / "accuracy_curves.png").stat().st_size > 0 and (out / "reward_std_per_step.png").stat().st_size > 0
    assert (out / "probe_reward_curves.png").stat().st_size > 0 and "(seeds reaching)" in text
    # TempFlow runs log the reward spread per branch step; the adaptive run its running spread
    m = [json.loads(l) for l in (out / "runs" / "tempflow" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_std/k0", "reward_std/k1"} <= set(m[1])
    m = [json.loads(l) for l in (out / "runs" / "tempflow_adaptive" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("adaptive_spread/") for k in m[-2])
    assert "per bifurcation step" in text
    # per-step approx-KL and velocity movement, not one pooled approx-KL
    assert "## Approx-KL per trained step" in text and "## Velocity movement per update" in text
    # full mode's docs/results.md: the report with the figures copied beside it
    md = methods.write_results_md([("shapes", text, out), ("compressibility", text, out)],
                                  tmp_path / "docs" / "results.md")
    body = md.read_text()
    assert "python bench/methods.py --quick" in body and "](results/accuracy_curves.png)" in body
    assert "](results/compressibility_accuracy_curves.png)" in body and "\n## Methods on the shapes task" in body
    assert (tmp_path / "docs" / "results" / "reward_std_per_step.png").exists()
    assert (tmp_path / "docs" / "results" / "compressibility_probe_reward_curves.png").exists()
    # the hand-written summary above the marker survives a rewrite; the reports below it are replaced
    md.write_text("# Results\n\nSummary by hand.\n\n" + methods.RESULTS_MARKER + "\nstale tables\n")
    body = methods.write_results_md([("shapes", text, out)], md).read_text()
    assert body.startswith("# Results\n\nSummary by hand.\n\n" + methods.RESULTS_MARKER)
    assert "stale tables" not in body and body.count(methods.RESULTS_MARKER) == 1 and "compressibility_" not in body
    # rewriting one task keeps the other task's section (rerunning the shapes grid keeps compressibility's results)
    comp = text.replace("# Methods on the shapes task", "# Methods on the compressibility task") + "\ncomp only\n"
    both = methods.write_results_md([("compressibility", comp, out)], md).read_text()
    assert both.index("\n## Methods on the shapes task") < both.index("\n## Methods on the compressibility task")
    again = methods.write_results_md([("shapes", text.replace("Seeds: 0.", "Seeds: 0 (new)."), out)], md).read_text()
    assert "comp only" in again and again.count("## Methods on the shapes task") == 1 and "Seeds: 0 (new)." in again
    assert again.replace("Seeds: 0 (new).", "Seeds: 0.") == both  # nothing else moved
    # a second call skips the finished runs and rebuilds the same report
    before = (out / "runs" / "flow_grpo" / "seed0" / "evals.jsonl").read_text()
    assert methods.run_grid(out, command="python bench/methods.py --quick", **kw) == text
    assert (out / "runs" / "flow_grpo" / "seed0" / "evals.jsonl").read_text() == before
    # a longer grid continues a finished run from its last checkpoint; its earlier eval points stay
    run = out / "runs" / "tempflow" / "seed0"
    head = (run / "evals.jsonl").read_text()
    assert methods.run_one("tempflow", 0, run, iterations=3, eval_every=1, quick=True, extra=TEST_OVERRIDES,
                           model_factory=small_model, reward=BrightnessReward(), eval_fn=fake_eval) == "resumed"
    text3 = (run / "evals.jsonl").read_text()
    assert text3.startswith(head) and [json.loads(l)["iteration"] for l in text3.splitlines()] == [0, 1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["iterations"] == 3


def test_quick_runs_every_method_on_the_compressibility_task(tmp_path):
    """--quick's second task: every method trains one iteration (Flow-GRPO-like ones 3) with the task's own JPEG
    reward and held-out mean-reward eval, in OUT/compressibility, and its report tabulates reward and probe."""
    out = tmp_path / "grid"
    text = methods.run_grid(out, methods=list(methods.METHODS), seeds=[0], iterations=1, eval_every=1, quick=True,
                            extra=TEST_OVERRIDES, model_factory=small_model, log=lambda *_: None,
                            command="python bench/methods.py --quick", task="compressibility")
    assert methods.task_folder(out, "compressibility") == out / "compressibility"
    for name, (label, _, _) in methods.METHODS.items():
        run = out / "compressibility" / "runs" / name / "seed0"
        rows = [json.loads(l) for l in (run / "evals.jsonl").read_text().splitlines()]
        assert rows[0]["accuracy"] < 0 and rows[0]["ci95"][0] <= rows[0]["accuracy"] <= rows[0]["ci95"][1], name
        summary = json.loads((run / "summary.json").read_text())
        assert summary["task"] == "compressibility" and summary["eval_metric"] == "held-out reward (kB)", name
        assert label in text
    assert text.startswith("# Methods on the compressibility task") and "## Probe reward vs model calls" in text
    assert "held-out reward (-kB of the JPEG)" in text
    # the report speaks of reward, not accuracy, and has no (empty) per-category table for a task without categories
    assert "| method | iteration | model calls | wall s | held-out reward (-kB of the JPEG) |" in text
    assert "## By category" not in text and "accuracy" not in text.replace("accuracy_curves", "")


def test_movement_table_per_step(tmp_path):
    text = methods.movement(tmp_path / "mv", iterations=1, quick=True, states=1, log=lambda *_: None)
    lines = text.splitlines()
    assert lines[2].startswith("| variant | approx-KL (pooled) | grad norm | ‖Δθ‖ | KL k=0")
    assert all(l.count("|") == lines[2].count("|") for l in lines[2:])
    rows = {l.split(" | ")[0].strip("| "): l for l in lines[4:]}
    assert set(rows) == {label for label, _, _ in methods.MOVEMENT_VARIANTS.values()}
    # quick settings, T = 4: Flow-GRPO trains k = 0..2, its k ≤ 3 variant (fraction 0.4) only k = 0
    assert rows["Flow-GRPO, k = 0..3 trained"].count("—") == 4
    assert (tmp_path / "mv" / "movement.md").read_text().strip() == text


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    kw = dict(eval_every=1, quick=True, extra=TEST_OVERRIDES, model_factory=small_model, reward=BrightnessReward(),
              eval_fn=fake_eval)
    assert methods.run_one("tempflow_adaptive", 0, tmp_path / "a", iterations=2, **kw) == "done"
    # "interrupted" after iteration 1: a finished 1-iteration run whose summary is removed
    assert methods.run_one("tempflow_adaptive", 0, tmp_path / "b", iterations=1, **kw) == "done"
    (tmp_path / "b" / "summary.json").unlink()
    assert methods.run_one("tempflow_adaptive", 0, tmp_path / "b", iterations=2, **kw) == "resumed"
    assert methods.run_one("tempflow_adaptive", 0, tmp_path / "b", iterations=2, **kw) == "skipped"
    rows = lambda d: [(r["iteration"], r["nfe"], r["accuracy"], r["categories"])
                      for r in map(json.loads, (tmp_path / d / "evals.jsonl").read_text().splitlines())]
    assert rows("a") == rows("b")


def test_adaptive_allocation_is_proportional_to_spread_with_a_floor():
    alg = TempFlowGRPO(num_steps=5, adaptive_bifurcation=True, adaptive_floor=0.2, adaptive_budget=1)
    state = {"adaptive_spread/k0": 3.0, "adaptive_spread/k1": 1.0, "adaptive_spread/k2": 0.0, "adaptive_spread/k3": 0.0}
    p = alg.step_probabilities(state)
    assert p == pytest.approx({0: 0.65, 1: 0.25, 2: 0.05, 3: 0.05})  # 0.8·s/Σs + 0.2/4
    counts = {k: 0 for k in p}
    for seed in range(4000):
        (k,) = alg.choose_steps(state, seed)
        counts[k] += 1
    for k in p:
        assert counts[k] / 4000 == pytest.approx(p[k], abs=0.03)
    assert alg.choose_steps(state, 7) == alg.choose_steps(dict(state), 7)  # deterministic
    # steps never observed get the largest spread seen; nothing observed: uniform
    assert alg.step_probabilities({"adaptive_spread/k0": 2.0})[3] == pytest.approx(0.25)
    assert alg.step_probabilities({}) == pytest.approx({k: 0.25 for k in range(4)})
    # the budget picks distinct steps among the candidates
    alg2 = TempFlowGRPO(num_steps=6, bifurcation_steps=[0, 2, 4], adaptive_bifurcation=True, adaptive_budget=2)
    chosen = alg2.choose_steps({}, 0)
    assert len(set(chosen)) == 2 and set(chosen) <= {0, 2, 4}
    assert alg2.plan_for(0, {}, seed=0).bifurcation_steps == tuple(chosen)
    # off: the fixed plan
    assert TempFlowGRPO(num_steps=5).plan_for(0, state, seed=0) == TempFlowGRPO(num_steps=5).plan()


def _adaptive_trainer(out, resume=False):
    cfg = load_config(Config, None, [
        "method=tempflow", f"output_dir={out}", "train.iterations=4", "train.prompts_per_iteration=2",
        "log.progress=false", "log.tensorboard=false", "sampling.num_steps=5", "tempflow.num_seeds=2",
        "tempflow.branches=3", "tempflow.adaptive_bifurcation=true", "tempflow.adaptive_budget=2",
        "train.learning_rate=1e-3", "train.clip_range=0.2", "checkpoint.every=1"])
    return Trainer(cfg, model=small_model(), reward=BrightnessReward(), eval_fn=fake_eval, resume=resume)


def test_adaptive_bifurcation_resumes_exactly(tmp_path):
    full = _adaptive_trainer(tmp_path / "a")
    ms = [full.run_iteration(i) for i in range(4)]
    steps = [sorted(int(k.split("/k")[1]) for k in m if k.startswith("reward_std/k")) for m in ms]
    assert all(len(s) == 2 for s in steps)
    assert any(k.startswith("adaptive_spread/") for k in full.counters.extra)
    part = _adaptive_trainer(tmp_path / "b")
    for i in range(2):
        part.run_iteration(i)
        part.iteration = i + 1
        part.save()
    resumed = _adaptive_trainer(tmp_path / "b", resume=True)
    assert resumed.iteration == 2 and resumed.counters.extra == part.counters.extra
    for i in (2, 3):
        m = resumed.run_iteration(i)
        assert m["loss"] == ms[i]["loss"]
        assert {k: v for k, v in m.items() if k.startswith(("reward_std/", "adaptive_spread/"))} == \
            {k: v for k, v in ms[i].items() if k.startswith(("reward_std/", "adaptive_spread/"))}
    assert resumed.counters.extra == full.counters.extra
    for (n, p), (_, q) in zip(full.named_params, resumed.named_params):
        assert torch.equal(p, q), n


def _fake_run(out, name, seed, accs, probes, calls_per_eval, wall_per_eval):
    """A finished run's evals.jsonl and metrics.jsonl (eval points 0, 10, 20, ...) without training."""
    run = out / "runs" / name / f"seed{seed}"
    run.mkdir(parents=True)
    evals, metrics = [], []
    for i, (acc, probe) in enumerate(zip(accs, probes)):
        it = 10 * i
        evals.append({"iteration": it, "nfe": calls_per_eval * i, "wall_seconds": wall_per_eval * i, "accuracy": acc,
                      "categories": {"counting": acc}})
        if it:
            metrics.append({"iteration": it, "total_nfe": calls_per_eval * i, "reward_mean": 0.5})
        metrics.append({"iteration": it, "probe_reward": probe})
    (run / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (run / "summary.json").write_text(json.dumps({"iterations": 10 * (len(accs) - 1)}))


def test_report_intervals_and_ablation_ordering_from_known_runs(tmp_path):
    """Five seeds with known numbers: the last-point gains, the calls-to-target bootstrap interval and the
    ablation rows are the paired differences by seed (t interval, checked by hand), and the reading follows
    their intervals."""
    import statistics

    out = tmp_path / "grid"
    seed_effect = [0.00, 0.04, -0.03, 0.02, -0.01]  # shared by every method of a seed: pairing removes it
    # end accuracy per method; bifurcation only < + weights < + seed grouping (full); weights with grouping: +0.002
    ends = {"tempflow_bifurcation_only": 0.62, "tempflow_no_seed_grouping": 0.63, "tempflow": 0.64,
            "tempflow_no_weights": 0.638, "flow_grpo": 0.65}
    noise = {name: [0.001 * ((3 * s + 2 * m) % 5 - 2) for s in range(5)] for m, name in enumerate(ends)}
    for name, end in ends.items():
        for s in range(5):
            e, n = seed_effect[s], noise[name][s]
            accs = [0.60 + e, (0.60 + end) / 2 + e + n, end + e + n]
            probes = [0.80 + e, 0.80 + e, 0.80 + e + 2 * (end - 0.6) + 10 * n]  # probe: ten times the noise
            _fake_run(out, name, s, accs, probes, 960 * 10 if name == "flow_grpo" else 3040 * 10, 100.0)
    text = methods.report(out, list(ends), list(range(5)), target=0.63, command="test")
    rows = {l.split(" | ")[0].lstrip("| "): l for l in text.splitlines() if l.startswith("| ")}

    def by_hand(a, b, probe=False):
        d = [(ends[a] - ends[b]) * (2 if probe else 1) + (noise[a][s] - noise[b][s]) * (10 if probe else 1)
             for s in range(5)]
        m, half = statistics.mean(d), 2.7764 * statistics.stdev(d) / 5 ** 0.5
        return f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]"

    for label, a, b in methods.ABLATION_STEPS:
        assert f"| {label} | {methods.METHODS[a][0]} − {methods.METHODS[b][0]} | 5 | 20 | {by_hand(a, b)} | " \
               f"{by_hand(a, b, probe=True)} |" in rows[label]
    assert rows["+ noise-aware weights"].endswith("| held-out helps, probe not resolved |")
    assert rows["+ seed grouping"].endswith("| held-out helps, probe not resolved |")
    assert rows["noise-aware weights, with seed grouping"].endswith("| held-out not resolved, probe not resolved |")
    # last point: the gain paired by seed (the seed effect cancels, the noise does not)
    gain = [0.05 + noise["flow_grpo"][s] for s in range(5)]
    m, half = statistics.mean(gain), 2.7764 * statistics.stdev(gain) / 5 ** 0.5
    flow = next(l for l in text.splitlines() if l.startswith("| Flow-GRPO | 5 | 20 |"))
    assert f"| {m:+.3f} [{m - half:+.3f}, {m + half:+.3f}] |" in flow
    # calls to 0.63: each Flow-GRPO seed's first eval point at or above it (seed 1 starts above it, seed 2 never
    # gets there): no interval when a seed does not reach it
    per_seed = methods.collect(out, ["flow_grpo"], range(5))["flow_grpo"]["per_seed"]
    assert methods.seed_calls_to_target(per_seed, 0.63) == [19200, 0, None, 9600, 19200]
    assert "| Flow-GRPO | 12000 ± 9191 (4/5) | 125 ± 96 |" in text  # wall s: 100 per eval
    # every seed reaches 0.58: the bootstrap interval of the mean, inside the seeds' range
    assert methods.seed_calls_to_target(per_seed, 0.58) == [0, 0, 9600, 0, 0]
    text = methods.report(out, ["flow_grpo"], list(range(5)), target=0.58, command="test")
    row = next(l for l in text.splitlines() if l.startswith("| Flow-GRPO | 1920 ["))
    lo, hi = (float(x) for x in row.split("[")[1].split("]")[0].split(", "))
    assert lo == 0 and 1920 < hi <= 9600 and "(5/5) | 20 [0, " in row


@pytest.mark.parametrize("argv, message", [
    (["--methods", "flow_grpo,tempflw"], "--methods: unknown 'tempflw'; choose from flow_grpo,"),
    (["--tasks", "shape"], "--tasks: unknown 'shape'; choose from shapes, compressibility"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--iterations", "0"], "--iterations must be >= 1, got 0"),
    (["--eval-every", "-1"], "--eval-every must be >= 1, got -1"),
    (["--report-only"], "--report-only: no run of shapes under"),
])
def test_bad_arguments_name_the_flag(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        methods.main(["--out", str(tmp_path / "grid"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()  # nothing written, no run started


HOLD_LOCK = """
import sys, time
from tempflow_fast.training.run_dir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_another_process_trains_is_skipped_and_its_logs_left_alone(tmp_path):
    """Two grid processes over one folder: the second skips a run the first holds, before touching its files
    (a fresh start would otherwise remove the first one's evals.jsonl and metrics.jsonl)."""
    import socket
    import subprocess
    import sys

    run = tmp_path / "grid" / "runs" / "tempflow" / "seed0"
    run.mkdir(parents=True)
    (run / "evals.jsonl").write_text('{"iteration": 0}\n')  # the live run's logs, no checkpoint yet
    (run / "metrics.jsonl").write_text('{"iteration": 0}\n')
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status = methods.run_one("tempflow", 0, run, iterations=1, eval_every=1, quick=True, extra=TEST_OVERRIDES,
                                 model_factory=small_model, reward=BrightnessReward(), eval_fn=fake_eval)
        assert status == f"busy (process {holder.pid} on host {socket.gethostname()})"
        assert (run / "evals.jsonl").read_text() == '{"iteration": 0}\n'
        assert (run / "metrics.jsonl").read_text() == '{"iteration": 0}\n'
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # once that process is gone the run starts here (a fresh start: the logs of an attempt without a checkpoint go)
    assert methods.run_one("tempflow", 0, run, iterations=1, eval_every=1, quick=True, extra=TEST_OVERRIDES,
                           model_factory=small_model, reward=BrightnessReward(), eval_fn=fake_eval) == "done"
    assert [json.loads(l)["iteration"] for l in (run / "evals.jsonl").read_text().splitlines()] == [0, 1]
    assert not (run / "run.lock").exists()


def test_versus_flow_grpo_matches_equal_calls_and_equal_wall_per_seed(tmp_path):
    """The equal-calls / equal-wall table: per seed, Flow-GRPO's eval point nearest in calls and the one nearest in
    wall seconds are different points here, and each difference is paired by seed (t interval, by hand)."""
    import statistics

    out = tmp_path / "grid"
    seed_effect = [0.00, 0.04, -0.03, 0.02, -0.01]
    noise = [0.002, -0.001, 0.003, 0.0, -0.004]
    for s in range(5):
        e = seed_effect[s]
        # Flow-GRPO: 1,000 calls and 100 s per 10 iterations, 4 points; TempFlow: 1,500 calls and 50 s, 3 points
        _fake_run(out, "flow_grpo", s, [0.60 + e, 0.62 + e, 0.64 + e, 0.66 + e],
                  [0.80 + e, 0.81 + e, 0.82 + e, 0.83 + e], 1000, 100.0)
        _fake_run(out, "tempflow", s, [0.60 + e, 0.63 + e, 0.65 + e + noise[s]],
                  [0.80 + e, 0.82 + e, 0.85 + e + 2 * noise[s]], 1500, 50.0)
    text = methods.report(out, ["flow_grpo", "tempflow"], list(range(5)), target=0.62, command="test")

    def ci(d):
        m, half = statistics.mean(d), 2.7764 * statistics.stdev(d) / 5 ** 0.5
        return f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]"

    calls = ci([0.65 + n - 0.66 for n in noise])          # TempFlow's 3,000 calls = Flow-GRPO's iteration 30
    probe = ci([0.85 + 2 * n - 0.83 for n in noise])
    wall = ci([0.65 + n - 0.62 for n in noise])           # TempFlow's 100 s = Flow-GRPO's iteration 10
    row = next(l for l in text.splitlines() if l.startswith("| TempFlow-GRPO | 5 | 20 | 3000 | 30, "))
    assert row == f"| TempFlow-GRPO | 5 | 20 | 3000 | 30, 3000 | {calls} | {probe} | 100 | 10, 100 | {wall} |"
    assert "## Against Flow-GRPO at equal model calls and at equal wall time" in text
    assert not any(l.startswith("| Flow-GRPO | 5 | 30 | 3000 | 30,") for l in text.splitlines())  # not against itself


def test_report_leaves_out_unfinished_runs_and_names_them(tmp_path, capsys):
    """A run still training (or cut off) has evals but no summary.json: counting it would put a different set of
    seeds behind each eval point's mean, so the report uses finished runs only and lists the others."""
    out = tmp_path / "grid"
    for s in range(3):
        _fake_run(out, "flow_grpo", s, [0.60, 0.62 + 0.01 * s, 0.64 + 0.01 * s], [0.8, 0.8, 0.8], 1000, 100.0)
    (out / "runs" / "flow_grpo" / "seed2" / "summary.json").unlink()
    # seed 2 stopped at its first eval point: with it, iteration 0 would average 3 seeds and 20 only 2
    (out / "runs" / "flow_grpo" / "seed2" / "evals.jsonl").write_text(
        json.dumps({"iteration": 0, "nfe": 0, "wall_seconds": 0.0, "accuracy": 0.50,
                    "categories": {"counting": 0.5}}) + "\n")
    text = methods.report(out, ["flow_grpo"], list(range(3)), target=0.62, command="test")
    assert "Left out, not finished (no summary.json): Flow-GRPO seed 2." in text
    row = next(l for l in text.splitlines() if l.startswith("| Flow-GRPO | 2 | "))  # seeds run: 2
    assert row == "| Flow-GRPO | 2 | 0.600 ± 0.000 | 0.625 ± 0.007 | 0.645 ± 0.007 |"
    assert methods.collect(out, ["flow_grpo"], range(3))["flow_grpo"]["unfinished"] == [2]
    # --report-only with nothing finished refuses by name instead of writing an empty report
    for s in range(2):
        (out / "runs" / "flow_grpo" / f"seed{s}" / "summary.json").unlink()
    with pytest.raises(SystemExit) as exc:
        methods.main(["--out", str(out), "--methods", "flow_grpo", "--seeds", "3", "--report-only",
                      "--no-results-md"])
    assert exc.value.code == 2 and "--report-only: no run of shapes under" in capsys.readouterr().err


def _generated_sections(text: str) -> dict:
    """docs/results.md below its marker, by task, without the report's command line (it names the folder given)."""
    return {task: "\n".join(l for l in part.splitlines() if not l.startswith("OMP_NUM_THREADS=1 python "))
            for task, part in methods.results_sections(text).items()}


def test_results_md_reports_are_what_the_committed_logs_give(tmp_path):
    """docs/results.md's generated sections (below the marker) are exactly what bench/methods.py --report-only
    writes from the logs committed in docs/results-data, at the seeds each section names: the page's tables cannot
    drift from its data (a finished run committed later, or a report change, shows up here until the page is
    rebuilt with the command at its top)."""
    page = ROOT / "docs" / "results.md"
    data = tmp_path / "results-data"
    for kind in ("summary.json", "evals.jsonl", "metrics.jsonl"):  # what .gitignore lets into the repository
        for f in (ROOT / "docs" / "results-data").rglob(kind):
            dest = data / f.relative_to(ROOT / "docs" / "results-data")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    want = _generated_sections(page.read_text())
    assert set(want) == {"shapes", "compressibility"}
    copy = tmp_path / "results.md"
    copy.write_text(page.read_text())
    for task, section in want.items():
        seeds = [int(s) for s in section.split("\nSeeds: ", 1)[1].split(".", 1)[0].split(", ")]
        assert seeds == list(range(len(seeds))), (task, seeds)
        methods.main(["--out", str(data), "--seeds", str(len(seeds)), "--tasks", task, "--report-only",
                      "--results-md", str(copy)])
    got = _generated_sections(copy.read_text())
    for task in want:
        assert got[task] == want[task], (f"docs/results.md's {task} report differs from what docs/results-data gives; "
                                         "rebuild it with the command at the top of its section")


def test_machines_note_says_what_the_runs_wall_seconds_came_from():
    """The report's wall-seconds caveat from the runs' machine records: how many runs carry one, how many
    host/CPU pairs, the calibration range and its ratio, and the runs resumed under a different record."""
    fast = {"host": "a", "cpu": "X", "threads": 1, "calibration_ms": 10.0}
    slow = {"host": "b", "cpu": "X", "threads": 1, "calibration_ms": 25.0}

    def rows(*machines):
        return [{"iteration": i, **({"machine": m} if m else {})} for i, m in enumerate(machines)]

    data = {"flow_grpo": {"per_seed": {0: rows(fast, fast), 1: rows(fast, slow)}},
            "tempflow": {"per_seed": {0: rows(slow, slow), 1: rows(None, None)}}}
    note = methods.machines_note(data)
    assert "3 of 4 runs carry one, on 2 host/CPU pairs, calibration 10.0–25.0 ms (2.50×); " \
           "1 resumed under a different record" in note
    data = {"flow_grpo": {"per_seed": {0: rows(None), 1: rows(None)}}}
    assert methods.machines_note(data).endswith("These logs record no machine: read wall seconds as indicative.")
