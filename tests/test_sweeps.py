"""Recorded pipeline states as ablations (pipeline/records/sweeps.py): sweeps, seeds and their spread."""
import statistics

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.records import sweeps

from pipeline.records import ledger
from pipeline.config import parse_params
from tests.conftest import ROOT


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty ledger of this test's own."""
    monkeypatch.setenv("MASKLLM_LEDGER", str(tmp_path / "states.json"))
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    return tmp_path


def params(prior_seed=0, learn_seed=0, **learn):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["prior"]["seed"] = prior_seed
    # the states below are written around kappa 100 and lambda0 1e-5, whatever the defaults are
    raw["learn"].update({"kappa": 100.0, "weight_reg": 1e-5, **learn}, seed=learn_seed)
    return parse_params(raw)


_clock = iter(range(1_000, 10**9, 1_000))  # record times in order: "the latest run" is well defined


def log_state(store, p, ppl: dict[str, float], name: str):
    """What the track stage records for a state whose in-domain (wiki) PPLs are ``ppl``, on test and
    (the same values, for brevity) on validation."""
    metrics = {f"{kind}.{row}.wiki": value for row, value in ppl.items() for kind in ("ppl", sweeps.CHOICE)}
    return ledger.record(p, metrics, now=next(_clock))


def test_seed_states_are_the_current_params_under_other_seeds(store, monkeypatch):
    for i, (seed, maskllm, sparsegpt) in enumerate([(0, 40.0, 50.0), (1, 42.0, 52.0), (2, 47.0, 51.0)]):
        monkeypatch.setenv("DVC_EXP_NAME", f"seed-{seed}")
        log_state(store, params(seed, seed), {"maskllm": maskllm, "sparsegpt": sparsegpt}, f"s{i}")
    log_state(store, params(1, 0), {"maskllm": 99.0}, "mixed")  # another seed pair: a state of its own
    log_state(store, params(0, 0, tau=2.0), {"maskllm": 60.0}, "tau")  # another param: not a seed state
    current = params(0, 0)
    states = sweeps.seed_states(current, "wiki")
    assert sorted(s["params"]["learn.seed"] + s["params"]["prior.seed"] for s in states) == ["00", "01", "11", "22"]
    spread = sweeps.seed_spread(current, "wiki")
    by_hand = [40.0, 42.0, 47.0, 99.0]
    mean = sum(by_hand) / 4
    assert spread["ppl.maskllm.wiki"] == pytest.approx(
        {"mean": mean, "min": 40.0, "max": 99.0, "n": 4,
         "std": (sum((v - mean) ** 2 for v in by_hand) / 3) ** 0.5})
    assert spread["ppl.sparsegpt.wiki"] == pytest.approx({"mean": 51.0, "min": 50.0, "max": 52.0, "n": 3, "std": 1.0})
    assert sweeps.seed_values(states) == {"prior.seed": [0, 1, 2], "learn.seed": [0, 1, 2]}
    assert sweeps.describe_seeds(sweeps.seed_values(states[:1])) == "prior.seed 0; learn.seed 0"
    # a seed state is no sweep point, a tau state is
    assert sweeps.sweep_points(current, "wiki", "ppl.maskllm.wiki") == {"learn.tau": [(4.0, 40.0), (2.0, 60.0)]}
    # a rerun of the same seeds (a later run) replaces the earlier one in the spread
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "def456")
    log_state(store, params(1, 1), {"maskllm": 43.0}, "rerun")
    spread = sweeps.seed_spread(current, "wiki", sweeps.states(current, "wiki"))
    assert spread["ppl.maskllm.wiki"] == pytest.approx(
        {"mean": (40.0 + 43.0 + 47.0 + 99.0) / 4, "min": 40.0, "max": 99.0, "n": 4,
         "std": statistics.stdev([40.0, 43.0, 47.0, 99.0])})
    # the rerun logged no SparseGPT result: its spread rests on the two other seeds
    assert spread["ppl.sparsegpt.wiki"] == pytest.approx({"mean": 50.5, "min": 50.0, "max": 51.0, "n": 2, "std": 2 ** -0.5})


def test_one_seed_has_no_spread(store):
    log_state(store, params(), {"maskllm": 40.0}, "only")
    spread = sweeps.seed_spread(params(), "wiki")
    assert spread["ppl.maskllm.wiki"] == {"mean": 40.0, "min": 40.0, "max": 40.0, "std": 0.0, "n": 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.5, 1e4), min_size=1, max_size=12))
def test_spread_statistics(values):
    s = sweeps.spread(values)
    assert s["min"] <= s["mean"] * (1 + 1e-12) and s["mean"] <= s["max"] * (1 + 1e-12) and s["n"] == len(values)
    assert s["std"] == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0, rel=1e-9, abs=1e-9)


def test_a_state_without_prior_is_a_point_of_both_prior_sweeps(store):
    log_state(store, params(), {"maskllm": 40.0}, "current")  # prior sparsegpt, strength 3
    log_state(store, params(prior="none"), {"maskllm": 70.0}, "none")
    log_state(store, params(prior_strength=1.0), {"maskllm": 45.0}, "alpha1")
    log_state(store, params(prior="wanda"), {"maskllm": 50.0}, "wanda")
    log_state(store, params(prior="wanda", prior_strength=0.0), {"maskllm": 71.0}, "two-changes")
    points = sweeps.sweep_points(params(), "wiki", "ppl.maskllm.wiki")
    # prior=none under any strength and strength 0 under any prior load no prior: the same point,
    # the latest run of it (two-changes) in both sweeps
    assert points == {"learn.prior": [("sparsegpt", 40.0), ("none", 71.0), ("wanda", 50.0)],
                      "learn.prior_strength": [(3.0, 40.0), (0.0, 71.0), (1.0, 45.0)]}
    # from a no-prior state, the other no-prior states are not rewritten into sweep points
    assert sweeps.sweep_points(params(prior="none"), "wiki", "ppl.maskllm.wiki") == {
        "learn.prior": [("sparsegpt", 40.0), ("none", 70.0), ("wanda", 50.0)]}


def test_sweep_table_orders_the_points_and_gives_gap_and_command(store, monkeypatch):
    for name, p, maskllm in [("current", params(), 40.0), ("none", params(prior="none"), 60.0),
                             ("alpha10", params(prior_strength=10.0), 38.0)]:
        log_state(store, p, {"maskllm": maskllm, "sparsegpt": 50.0, "wanda": 45.0, "dense": 15.0}, name)
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "def456")
    log_state(store, params(learn_seed=1), {"maskllm": 43.0}, "seed1")
    current = params()
    runs = sweeps.sweep_runs(current, "wiki", "ppl.maskllm.wiki")
    spread = sweeps.seed_spread(current, "wiki")
    table = sweeps.sweep_table("learn.prior_strength", runs["learn.prior_strength"], "wiki", ["wiki", "pydocs"], 3.0,
                               spread).splitlines()
    assert table[0] == ("| `learn.prior_strength` | MaskLLM wiki validation PPL | gap closed (wiki validation) | MaskLLM pydocs "
                        "| reproduce |")
    # in order of the value; gap against the best one-shot row, Wanda: (45 - 38) / (45 - 15)
    assert table[2:] == [
        "| 0.0 | 60.00 | -50.0 % of Wanda | — | `dvc exp run -S learn.prior_strength=0.0` |",
        "| **3.0** (current) | 40.00 | 16.7 % of Wanda | — | `dvc repro` |",
        "| 10.0 | 38.00 | 23.3 % of Wanda | — | `dvc exp run -S learn.prior_strength=10.0` |",
        "| current, 2 seeds (min–max) | 40.00–43.00 | | — | |"]
    prior = sweeps.sweep_table("learn.prior", runs["learn.prior"], "wiki", ["wiki"], "sparsegpt").splitlines()
    assert [row.split(" | ")[0] for row in prior[2:]] == ["| none", "| **sparsegpt** (current)"]
    assert prior[2].endswith("`dvc exp run -S learn.prior=none` |")


def test_a_sweep_point_run_under_several_seeds_has_its_own_spread(store, monkeypatch):
    refs = {"sparsegpt": 50.0, "dense": 15.0}
    log_state(store, params(), {"maskllm": 40.0, **refs}, "current")
    log_state(store, params(kappa=300.0), {"maskllm": 35.0, **refs}, "k300")
    for seed, maskllm in [(0, 30.0), (1, 33.0), (2, 31.0)]:
        log_state(store, params(learn_seed=seed, kappa=1000.0), {"maskllm": maskllm, **refs}, f"k1000-{seed}")
    log_state(store, params(tau=2.0), {"maskllm": 45.0, **refs}, "tau2")
    log_state(store, params(learn_seed=1, tau=2.0), {"maskllm": 99.0}, "tau2-seed1")  # tau 2 under another seed
    log_state(store, params(learn_seed=2, tau=2.0, kappa=300.0), {"maskllm": 77.0}, "far")  # nobody's seed
    current = params()
    spreads = sweeps.point_spreads(current, "wiki")
    # kappa 300 and the current point ran under one seed pair each
    assert {k: list(v) for k, v in spreads.items()} == {"learn.tau": [2.0], "learn.kappa": [1000.0]}
    assert spreads["learn.tau"][2.0]["ppl.maskllm.wiki"] == pytest.approx(
        {"mean": 72.0, "min": 45.0, "max": 99.0, "n": 2, "std": statistics.stdev([45.0, 99.0])})
    assert spreads["learn.tau"][2.0]["ppl.sparsegpt.wiki"]["n"] == 1  # the seed-1 run logged no SparseGPT row
    assert spreads["learn.kappa"][1000.0]["ppl.maskllm.wiki"] == pytest.approx(
        {"mean": 94.0 / 3, "min": 30.0, "max": 33.0, "n": 3, "std": statistics.stdev([30.0, 33.0, 31.0])})
    runs = sweeps.sweep_runs(current, "wiki", "ppl.maskllm.wiki")
    table = sweeps.sweep_table("learn.kappa", runs["learn.kappa"], "wiki", ["wiki"], 100.0,
                               sweeps.seed_spread(current, "wiki"), spreads["learn.kappa"]).splitlines()
    # the point is its run under the current seeds (seed 0); its range follows the table, one cell per column
    assert table[2:] == ["| **100.0** (current) | 40.00 | 28.6 % of SparseGPT | `dvc repro` |",
                         "| 300.0 | 35.00 | 42.9 % of SparseGPT | `dvc exp run -S learn.kappa=300.0` |",
                         "| 1000.0 | 30.00 | 57.1 % of SparseGPT | `dvc exp run -S learn.kappa=1000.0` |",
                         "| 1000.0, 3 seeds (min–max) | 30.00–33.00 | | |"]
    assert all(row.count("|") == table[0].count("|") for row in table)


def test_sweeps_run_around_a_former_default_stay_as_a_centre_of_their_own(store, monkeypatch):
    refs = {"sparsegpt": 50.0, "dense": 15.0}

    def point(p, maskllm, name):  # a sweep point: a queued `dvc exp run`
        monkeypatch.setenv("DVC_EXP_NAME", name)
        log_state(store, p, {"maskllm": maskllm, **refs}, name)
        monkeypatch.delenv("DVC_EXP_NAME")

    # kappa 100 was the default (`dvc repro` in the workspace); the tau and lambda0 sweeps ran around it
    log_state(store, params(), {"maskllm": 40.0, **refs}, "k100")
    for tau, maskllm in [(1.0, 42.0), (2.0, 38.0), (8.0, 47.0)]:
        point(params(tau=tau), maskllm, f"k100-tau{tau}")
    point(params(learn_seed=1), 44.0, "k100-seed1")
    for reg, maskllm in [(0.0, 41.0), (1e-4, 43.0)]:
        point(params(weight_reg=reg), maskllm, f"k100-reg{reg}")
    # kappa 1000 is the default now: tau 2 rerun around it, lambda0 not
    log_state(store, params(kappa=1000.0), {"maskllm": 30.0, **refs}, "k1000")
    point(params(kappa=1000.0, tau=2.0), 29.0, "k1000-tau2")
    # no centres: a sweep point is none (kappa 300), nor a default under another seed
    point(params(kappa=300.0, tau=8.0), 60.0, "k300-tau8")
    log_state(store, params(learn_seed=1, kappa=1000.0), {"maskllm": 61.0, **refs}, "k1000-s1")
    for tau in (2.0, 8.0):
        point(params(learn_seed=1, kappa=1000.0, tau=tau), 61.0, f"k1000-s1-tau{tau}")
    current = params(kappa=1000.0)
    metric = "ppl.maskllm.wiki"
    assert sweeps.other_centres(current, "wiki", metric) == {
        "learn.tau": [{"learn.kappa": "100.0"}], "learn.weight_reg": [{"learn.kappa": "100.0"}]}
    curves = sweeps.sweep_curves(current, "wiki")
    got = {param: [(c, sorted(sweeps.values_of(points, metric))) for c, points in cs] for param, cs in curves.items()}
    assert got == {
        "learn.tau": [(None, [(2.0, 29.0), (4.0, 30.0)]),
                      ({"learn.kappa": "100.0"}, [(1.0, 42.0), (2.0, 38.0), (4.0, 40.0), (8.0, 47.0)])],
        "learn.kappa": [(None, [(100.0, 40.0), (1000.0, 30.0)])],
        # the current point alone, so the figure shows where the current params stand
        "learn.weight_reg": [(None, [(1e-05, 30.0)]),
                             ({"learn.kappa": "100.0"}, [(0.0, 41.0), (1e-05, 40.0), (0.0001, 43.0)])]}
    around = curves["learn.tau"][1]
    spreads = sweeps.point_spreads(current, "wiki", runs={"learn.tau": around[1]})
    table = sweeps.sweep_table("learn.tau", around[1], "wiki", ["wiki"], 4.0, sweeps.seed_spread(current, "wiki"),
                               spreads["learn.tau"], around=around[0]).splitlines()
    # every point reproduced with the centre's change; the centre's range is its own seeds', (50 - 38) / 35
    assert table[2:] == [
        "| 1.0 | 42.00 | 22.9 % of SparseGPT | `dvc exp run -S learn.kappa=100.0 -S learn.tau=1.0` |",
        "| 2.0 | 38.00 | 34.3 % of SparseGPT | `dvc exp run -S learn.kappa=100.0 -S learn.tau=2.0` |",
        "| **4.0** (centre) | 40.00 | 28.6 % of SparseGPT | `dvc exp run -S learn.kappa=100.0` |",
        "| 8.0 | 47.00 | 8.6 % of SparseGPT | `dvc exp run -S learn.kappa=100.0 -S learn.tau=8.0` |",
        "| centre, 2 seeds (min–max) | 40.00–44.00 | | |"]
    assert sweeps.describe_centre(around[0]) == "learn.kappa=100.0"
    assert sweeps.describe_centre({"learn.prior": "file", "learn.prior_file": "masks/general.safetensors"}) == \
        "learn.prior=file:general"


def test_after_the_default_moved_twice_each_former_default_is_a_centre(store, monkeypatch):
    refs = {"sparsegpt": 50.0, "dense": 15.0}

    def point(p, maskllm, name):
        monkeypatch.setenv("DVC_EXP_NAME", name)
        log_state(store, p, {"maskllm": maskllm, **refs}, name)
        monkeypatch.delenv("DVC_EXP_NAME")

    # default 1: kappa 100, with the prior-strength and lambda0 sweeps around it
    log_state(store, params(), {"maskllm": 40.0, **refs}, "k100")
    for alpha, maskllm in [(0.0, 900.0), (10.0, 80.0)]:
        point(params(prior_strength=alpha), maskllm, f"k100-a{alpha}")
    for reg, maskllm in [(0.0, 41.0), (1e-4, 43.0)]:
        point(params(weight_reg=reg), maskllm, f"k100-reg{reg}")
    # default 2: kappa 1000 (first run as a sweep point), with two points of its own around it
    point(params(kappa=1000.0), 30.0, "kappa-1000")
    log_state(store, params(kappa=1000.0), {"maskllm": 30.0, **refs}, "k1000")
    point(params(kappa=1000.0, prior="none"), 950.0, "k1000-none")
    for reg, maskllm in [(0.0, 31.0), (1e-4, 29.0)]:
        point(params(kappa=1000.0, weight_reg=reg), maskllm, f"k1000-reg{reg}")
    # a point around a former default draws a curve through it (tau 4 -> 8), but a pair of sweep
    # points makes no centre: no kappa curve around tau 8
    point(params(kappa=1000.0, tau=8.0), 32.0, "k1000-tau8")
    point(params(tau=8.0), 47.0, "k100-tau8")
    # default 3, now: lambda0 1e-4
    current = params(kappa=1000.0, weight_reg=1e-4)
    log_state(store, current, {"maskllm": 29.0, **refs}, "k1000-reg1e-4")
    metric = "ppl.maskllm.wiki"
    k1000, k100 = {"learn.weight_reg": "1e-05"}, {"learn.kappa": "100.0", "learn.weight_reg": "1e-05"}
    # fewest changes first; the lambda0 sweep around kappa 1000 is the current params' own
    assert sweeps.other_centres(current, "wiki", metric) == {
        "learn.tau": [k1000, k100], "learn.kappa": [k1000], "learn.prior_strength": [k1000, k100],
        "learn.prior": [k1000, k100], "learn.weight_reg": [{"learn.kappa": "100.0"}]}
    got = {param: [(c, sorted(sweeps.values_of(points, metric), key=str)) for c, points in cs]
           for param, cs in sweeps.sweep_curves(current, "wiki").items()}
    assert got == {
        "learn.tau": [(None, [(4.0, 29.0)]), (k1000, [(4.0, 30.0), (8.0, 32.0)]), (k100, [(4.0, 40.0), (8.0, 47.0)])],
        # kappa 100 under lambda0 1e-4 (a point of the lambda0 sweep around kappa 100) is on the current curve
        "learn.kappa": [(None, [(100.0, 43.0), (1000.0, 29.0)]), (k1000, [(100.0, 40.0), (1000.0, 30.0)])],
        "learn.prior_strength": [(None, [(3.0, 29.0)]), (k1000, [(0.0, 950.0), (3.0, 30.0)]),
                                 (k100, [(0.0, 900.0), (10.0, 80.0), (3.0, 40.0)])],
        "learn.prior": [(None, [("sparsegpt", 29.0)]), (k1000, [("none", 950.0), ("sparsegpt", 30.0)]),
                        (k100, [("none", 900.0), ("sparsegpt", 40.0)])],
        "learn.weight_reg": [(None, [(0.0, 31.0), (0.0001, 29.0), (1e-05, 30.0)]),
                             ({"learn.kappa": "100.0"}, [(0.0, 41.0), (0.0001, 43.0), (1e-05, 40.0)])]}
    assert sweeps.describe_centre(k100) == "learn.kappa=100.0, learn.weight_reg=1e-05"


def test_sweep_panels_put_every_curve_and_the_best_one_shot_reference_of_each_domain():
    def run(**ppl):
        return {"params": {}, "metrics": {f"validation_ppl.maskllm.{d}": v for d, v in ppl.items()}, "tags": {}}

    curves = {"learn.tau": [(None, {"4.0": ({}, run(wiki=30.0, shakespeare=200.0)), "2.0": ({}, run(wiki=29.0))}),
                            ({"learn.kappa": "100.0"}, {"4.0": ({}, run(wiki=40.0, shakespeare=210.0))})]}
    seeds = {"min": 29.5, "max": 31.0, "n": 2}
    spreads = {"learn.tau": [{4.0: {"validation_ppl.maskllm.wiki": seeds}}, {}]}
    table = {"dense": {"wiki": 15.0, "shakespeare": 50.0}, "wanda": {"wiki": 60.0, "shakespeare": 150.0},
             "sparsegpt": {"wiki": 50.0, "shakespeare": 160.0}, "maskllm": {"wiki": 30.0, "shakespeare": 200.0}}
    spread = {"validation_ppl.sparsegpt.wiki": {"min": 49.0, "max": 51.0, "n": 3}}
    panels = sweeps.sweep_panels(curves, spreads, table, ["wiki", "shakespeare", "pydocs"], "wiki", spread)
    # wiki: SparseGPT is the best one-shot row (named once); shakespeare: Wanda is;
    # pydocs: no point on any curve, no panel
    assert panels == {"learn.tau": [
        {"domain": "wiki", "in_domain": True, "points": [(4.0, 30.0), (2.0, 29.0)], "point_spread": {4.0: seeds},
         "others": [{"label": "kappa=100.0", "points": [(4.0, 40.0)], "point_spread": {}}],
         "references": {"dense": 15.0, "sparsegpt": 50.0}, "spread": {"sparsegpt": spread["validation_ppl.sparsegpt.wiki"]}},
        {"domain": "shakespeare", "in_domain": False, "points": [(4.0, 200.0)], "point_spread": {},
         "others": [{"label": "kappa=100.0", "points": [(4.0, 210.0)], "point_spread": {}}],
         "references": {"dense": 50.0, "wanda": 150.0, "sparsegpt": 160.0}, "spread": {}}]}


def test_current_value_is_how_sweep_points_name_it():
    assert sweeps.current_value(params(tau=2.0), "learn.tau") == 2.0
    assert sweeps.current_value(params(), "learn.steps") == 64
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["learn"].update(prior="file", prior_file="masks/general.safetensors")
    assert sweeps.current_value(parse_params(raw), "learn.prior") == "file:general"


def test_neighbours_are_the_states_within_two_params_with_their_command(store, monkeypatch):
    def log(p, maskllm, name, **more):
        monkeypatch.setenv("DVC_EXP_NAME", name)
        log_state(store, p, {"maskllm": maskllm, "sparsegpt": 50.0, "dense": 14.0, **more}, name)

    log(params(), 36.0, "current")
    log(params(tau=2.0), 40.0, "tau-2")
    log(params(betas=[0.9, 0.95], eps=1e-5), 38.0, "authors-adam")
    log(params(1, 1), 37.0, "seeds-1")                        # two seeds: two changes
    log(params(0, 0, tau=2.0, kappa=30.0, steps=8), 90.0, "far")  # three changes: not a neighbour
    log(params(tau=2.0), 41.0, "tau-2-again")                 # the latest run of a change wins
    log(params(prior="file", prior_file="masks/general.safetensors"), 35.0, "file")  # prior + file: one change
    rows = sweeps.neighbours(params(), "wiki")
    got = {tuple(r["changes"].items()): (r["metrics"]["ppl.maskllm.wiki"], r["exp"]) for r in rows}
    assert got == {(): (36.0, "current"), (("learn.tau", "2.0"),): (41.0, "tau-2-again"),
                   (("learn.betas", "[0.9, 0.95]"), ("learn.eps", "1e-05")): (38.0, "authors-adam"),
                   (("prior.seed", "1"), ("learn.seed", "1")): (37.0, "seeds-1"),
                   (("learn.prior", "file:general"),): (35.0, "file")}
    assert rows[0]["changes"] == {} and len(rows[1]["changes"]) == 1  # fewest changes first
    assert sweeps.command({}) == "dvc repro"
    assert [sweeps.command(r["sets"]) for r in rows if r["exp"] == "file"] == [
        "dvc exp run -S learn.prior=file -S learn.prior_file=masks/general.safetensors"]
    assert sweeps.command({"learn.betas": "[0.9, 0.95]", "learn.eps": "1e-05"}) == \
        "dvc exp run -S 'learn.betas=[0.9,0.95]' -S learn.eps=1e-05"
    text = sweeps.neighbours_table(rows, "wiki", ["wiki"])
    # gap closed against SparseGPT, by hand: (50 - 41) / (50 - 14) = 25.0 %
    assert "| `learn.tau=2.0` | 41.00 | 25.0 % | `dvc exp run -S learn.tau=2.0` |" in text.splitlines()
    assert "| (current) | 36.00 | 38.9 % | `dvc repro` |" in text.splitlines()


def test_the_budget_curve_takes_each_recipe_at_every_recorded_step_count(store, monkeypatch):
    """Two recipes (the current params, and another in kappa), each at the steps it ran; the 64-step
    points under three seeds carry their spread; other changes are no point of either curve."""
    refs = {"dense": 15.0, "sparsegpt": 50.0}
    for seed, (tuned, other) in enumerate([(40.0, 45.0), (42.0, 46.0), (41.0, 44.0)]):
        log_state(store, params(learn_seed=seed), {"maskllm": tuned, **refs}, f"t{seed}")
        log_state(store, params(learn_seed=seed, kappa=1000.0), {"maskllm": other, **refs}, f"o{seed}")
    log_state(store, params(steps=256), {"maskllm": 35.0, **refs}, "t256")
    log_state(store, params(steps=256, kappa=1000.0), {"maskllm": 30.0, **refs}, "o256")
    log_state(store, params(steps=256, tau=2.0), {"maskllm": 1.0, **refs}, "tau")  # another param: no point
    recipes = {"tuned": params(), "other": params(kappa=1000.0)}
    curves = sweeps.budget(recipes, "wiki", sweeps.states(params(), "wiki"))
    assert list(curves["tuned"]) == [64, 256] and list(curves["other"]) == [64, 256]
    tokens = params().learn.batch_size * params().learn.seqlen
    assert curves["tuned"][256]["tokens"] == 256 * tokens
    at64 = curves["tuned"][64]["spread"][f"{sweeps.CHOICE}.maskllm.wiki"]
    assert (at64["n"], at64["min"], at64["max"], at64["mean"]) == (3, 40.0, 42.0, 41.0)
    assert curves["other"][256]["spread"][f"{sweeps.CHOICE}.maskllm.wiki"]["mean"] == 30.0
    table = sweeps.budget_table(curves, "wiki", {"tuned": "dvc exp run", "other": "dvc exp run -S learn.kappa=1000"})
    rows = table.splitlines()[2:]
    # gap closed: (50 - 41) / (50 - 15) = 25.7 %; (50 - 30) / (50 - 15) = 57.1 %
    assert rows[0].startswith(f"| tuned | 64 | {64 * tokens:,} | 41.00 (40.00–42.00) | 3 | 25.7 % of SparseGPT |")
    assert rows[3] == (f"| other | 256 | {256 * tokens:,} | 30.00 | 1 | 57.1 % of SparseGPT | "
                       "`dvc exp run -S learn.kappa=1000 -S learn.steps=256` |")


def test_a_spread_narrower_than_float32_evaluation_noise_is_not_a_range():
    # the same row evaluated on two CPU models differs by ~1e-7 of its value; a seed does far more
    assert not sweeps.varied({"min": 14.006998, "max": 14.006999, "n": 2})
    assert sweeps.varied({"min": 29.61, "max": 30.84, "n": 2})
    assert not sweeps.varied({"min": 29.61, "max": 30.84, "n": 1})
    assert not sweeps.varied(None)
