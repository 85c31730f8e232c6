"""Training-split aggregate-posterior estimates (tvae_core.training_split): the same numbers as the
estimators they call, limits flagged where they are reached, and a cache that is hit without
recomputing and rebuilt when damaged."""
import dataclasses
import json
import math

import pytest
import torch

from helpers import tiny_config, write_corpus
from tvae_core import estimators as est
from tvae_core import training_split
from tvae_core.cache import read_checked_json, write_checked_json
from tvae_core.data import iterate_batches
from tvae_core.build import training_corpus
from tvae_core.runs import train_or_load
from tvae_core.training_split import aggregate_from_posteriors, limited_value, training_split_aggregate


def _posteriors(num_points=400, dim=4, loc_scale=1.0, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = loc_scale * torch.randn(num_points, dim, generator=g, dtype=torch.float64)
    return loc, torch.full_like(loc, scale)


def test_the_numbers_are_those_of_the_estimators_it_calls():
    loc, scale = _posteriors()
    result = aggregate_from_posteriors(loc, scale, seed=3)
    with_self, loo = est.self_and_leave_one_out_terms(loc, scale, generator=torch.Generator().manual_seed(3))
    assert result.num_sentences == 400 and result.rate == with_self.rate
    assert result.mutual_information == with_self.mutual_information.value
    assert result.mutual_information_ceiling == pytest.approx(math.log(400))
    assert result.mutual_information_loo == loo.mutual_information.value
    assert result.marginal_kl == with_self.marginal_kl.value and result.marginal_kl_loo == loo.marginal_kl.value
    assert result.marginal_kl_floor == pytest.approx(with_self.rate - math.log(400))
    assert result.active_units == est.active_units(loc).num_active == 4
    assert result.analytic_rate == pytest.approx(float(est.kl_per_dimension(loc, scale).sum()))
    # the same samples: MI + marginal KL = rate for both estimators
    assert result.mutual_information + result.marginal_kl == pytest.approx(result.rate, abs=1e-9)
    assert result.mutual_information_loo + result.marginal_kl_loo == pytest.approx(result.rate, abs=1e-9)
    assert not result.at_limit


def test_a_gaussian_code_with_known_mi_and_marginal_kl_is_bracketed():
    """Means mu ~ N(0, I_4) and q(z|x) = N(mu, 0.25 I): q(z) = N(0, 1.25 I), so I_q = 2 log 5 = 3.22,
    KL(q(z) || p(z)) = 2 (0.25 - log 1.25) = 0.054 and the rate 2 (0.25 + log 4) = 3.27 nats. The
    self term's MI lies below, the leave-one-out MI above (3 standard errors), the marginal KL the
    other way round, and the closed-form rate within 4 standard errors of its per-point spread."""
    loc, scale = _posteriors(num_points=2000, dim=4, scale=0.5, seed=7)
    result = aggregate_from_posteriors(loc, scale, seed=8)
    mi, kl, rate = 2 * math.log(5.0), 2 * (0.25 - math.log(1.25)), 2 * (0.25 + math.log(4.0))
    se = result.mutual_information_se
    assert result.mutual_information - 3 * se <= mi <= result.mutual_information_loo + 3 * se
    assert result.marginal_kl_loo - 3 * se <= kl <= result.marginal_kl + 3 * se
    assert result.mutual_information_loo - result.mutual_information < 0.1   # N >> e^I: a narrow bracket
    per_point_sd = math.sqrt(0.25 * 4 * 2.0)      # Var_mu of 1/2 sum_d mu_d^2, mu_d^2 ~ chi2(1)
    assert abs(result.analytic_rate - rate) < 4 * per_point_sd / math.sqrt(2000)


def test_an_autoencoder_like_posterior_puts_mi_at_its_ceiling_and_marginal_kl_at_its_floor():
    loc, scale = _posteriors(loc_scale=3.0, scale=1e-3)         # well separated, tiny scales: MI >> log N
    result = aggregate_from_posteriors(loc, scale)
    assert result.mutual_information == pytest.approx(math.log(400), abs=1e-6)
    assert result.mutual_information_at_ceiling and result.marginal_kl_at_floor and result.at_limit
    assert result.mutual_information_loo > result.mutual_information + 1.0   # no ceiling leaving one out
    assert limited_value(result.mutual_information, result.mutual_information_ceiling, True, ">=") \
        == f">= {result.mutual_information:.2f} (ceiling {math.log(400):.2f})"
    # within the at-limit tolerance, the bound is the estimate, never the limit
    assert limited_value(8.18, 8.23, True, ">=") == ">= 8.18 (ceiling 8.23)"
    assert limited_value(8.50, 8.45, True, "<=") == "<= 8.50 (floor 8.45)"


def test_z_from_a_subset_of_sentences_keeps_every_component_the_ceiling_and_the_expectation():
    """The training split's default: z drawn for SAMPLED_POINTS sentences, q(z) over all N. On N =
    4,000 points, z from 1,000 of them: the ceiling is still log N, the estimates agree with the
    full pass within 4 of their (larger) standard errors, and the same identities hold."""
    loc, scale = _posteriors(num_points=4000, dim=4, scale=0.4)
    full = aggregate_from_posteriors(loc, scale, seed=5, sampled_points=None)
    part = aggregate_from_posteriors(loc, scale, seed=5, sampled_points=1000)
    assert (full.sampled_points, part.sampled_points, part.num_sentences) == (4000, 1000, 4000)
    assert part.mutual_information_ceiling == full.mutual_information_ceiling == pytest.approx(math.log(4000))
    assert part.mutual_information_se > full.mutual_information_se > 0
    for name in ("mutual_information", "marginal_kl"):
        se = getattr(part, f"{name}_se")
        assert abs(getattr(part, name) - getattr(full, name)) < 4 * se, name
    assert part.mutual_information + part.marginal_kl == pytest.approx(part.rate, abs=1e-9)
    assert part.mutual_information <= part.mutual_information_loo      # the bracket, same samples
    assert part.active_units == full.active_units == 4                # counted on all N posteriors
    every = aggregate_from_posteriors(loc, scale, seed=5, sampled_points=4000)   # >= N: the full pass
    assert dataclasses.replace(every, seconds=0.0) == dataclasses.replace(full, seconds=0.0)


def test_a_collapsed_posterior_is_far_from_both_limits():
    loc, scale = torch.zeros(300, 4, dtype=torch.float64), torch.ones(300, 4, dtype=torch.float64)
    result = aggregate_from_posteriors(loc, scale)
    assert abs(result.mutual_information) < 1e-9 and abs(result.marginal_kl) < 1e-9
    assert not result.at_limit and result.active_units == 0
    assert limited_value(0.123, 5.0, False, ">=") == "0.12"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("split")
    corpus = write_corpus(base / "corpus.txt")
    return train_or_load(tiny_config(corpus, "fb", 2.0, max_steps=4), base / "runs", progress=False)


@pytest.mark.slow
def test_a_run_is_encoded_whole_and_its_entry_is_read_back_without_recomputing(tiny_run, monkeypatch):
    for path in tiny_run.path.glob("training-split-aggregate-*"):
        path.unlink()
    first = training_split_aggregate(tiny_run, seed=1)
    sequences = training_corpus(tiny_run.config).token_ids("train")
    params = est.collect_posterior_parameters(
        tiny_run.model, iterate_batches(sequences, 16, tiny_run.vocab.pad_id, shuffle=False, bucket=False),
        progress=False)
    direct = aggregate_from_posteriors(params.loc, params.scale, seed=1)
    assert first.num_sentences == len(sequences) and first.label == tiny_run.label and first.split == "train"
    assert first.sampled_points == len(sequences)          # fewer than SAMPLED_POINTS: every sentence
    # encoded in length order, put back in corpus order: the same posteriors up to float rounding
    by_length = training_split.encode_in_length_order(tiny_run.model, sequences, tiny_run.vocab.pad_id)
    torch.testing.assert_close(by_length.loc, params.loc, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_length.scale, params.scale, atol=1e-5, rtol=1e-5)
    for name in ("rate", "mutual_information", "mutual_information_loo", "marginal_kl", "marginal_kl_loo"):
        assert getattr(first, name) == pytest.approx(getattr(direct, name), abs=1e-4), name
    assert first.active_units == direct.active_units

    def recomputing(*args, **kwargs):
        raise AssertionError("recomputed a cached entry")

    monkeypatch.setattr(training_split.est, "self_and_leave_one_out_terms", recomputing)
    assert training_split_aggregate(tiny_run, seed=1) == first
    with pytest.raises(AssertionError, match="recomputed"):   # other parameters, another entry
        training_split_aggregate(tiny_run, seed=1, max_sentences=20)


def _damage(case, path, key):
    stored = json.loads(path.read_text())
    payload = stored["payload"]
    if case == "truncated":
        path.write_text(path.read_text()[:30])
        return
    if case == "edited value":
        payload["result"]["mutual_information"] += 1.0               # checksum no longer matches
        path.write_text(json.dumps(stored))
        return
    if case == "another run's entry (re-signed)":
        payload["run_key"] = "0123456789abcdef"
    elif case == "other weights (re-signed)":
        payload["weights_sha256"] = "0" * 64
    elif case == "wrong type (re-signed)":
        payload["result"]["num_sentences"] = "many"
    elif case == "another seed's result (re-signed)":
        payload["result"]["seed"] = 7
    write_checked_json(path, payload, key)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated", "edited value", "another run's entry (re-signed)",
                                  "other weights (re-signed)", "wrong type (re-signed)",
                                  "another seed's result (re-signed)"])
def test_a_damaged_entry_is_set_aside_and_recomputed(tiny_run, caplog, case):
    first = training_split_aggregate(tiny_run, seed=2)
    (path,) = tiny_run.path.glob(f"training-split-aggregate-{training_split.training_split_key(tiny_run.config.key, seed=2)}.json")
    key = path.stem[len("training-split-aggregate-"):]
    _damage(case, path, key)
    with caplog.at_level("WARNING", logger="tvae_core"):
        again = training_split_aggregate(tiny_run, seed=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and all(path.name in w for w in warnings), warnings
    assert dataclasses.replace(again, seconds=0) == dataclasses.replace(first, seconds=0)
    assert list(tiny_run.path.glob(f"{path.name}.damaged-*"))
    stored = read_checked_json(path, key)
    assert stored["run_key"] == tiny_run.config.key and stored["weights_sha256"] == tiny_run.weights_sha256


def test_marginal_kl_is_compared_only_between_brackets_below_their_limits():
    def result(kl_loo, kl, at_limit=False):
        return training_split.TrainingSplitAggregate(
            label="", run_key="", split="train", num_sentences=100, rate=5.0, analytic_rate=5.0,
            sampled_points=100, mutual_information=5.0 - kl, mutual_information_se=0.01,
            marginal_kl_se=0.01, mutual_information_ceiling=math.log(100),
            mutual_information_at_ceiling=at_limit, mutual_information_loo=5.0 - kl_loo, marginal_kl=kl,
            marginal_kl_floor=5.0 - math.log(100), marginal_kl_at_floor=at_limit, marginal_kl_loo=kl_loo,
            active_units=1, seed=0, seconds=0.0)

    compare = training_split.compare_marginal_kl
    assert compare(result(2.0, 2.5), result(0.5, 1.0)) == "greater"
    assert compare(result(0.5, 1.0), result(2.0, 2.5)) == "less"
    assert compare(result(0.5, 2.1), result(2.0, 2.5)) == "overlap"
    assert compare(result(2.0, 2.5, at_limit=True), result(0.5, 1.0)) == "at the ceiling"
    assert compare(result(2.0, 2.5), result(0.5, 1.0, at_limit=True)) == "at the ceiling"


def test_the_book_runs_whose_training_split_measures_train_all_caches_are_the_pages_runs():
    from tvae_core.experiments import budget_study, thesis_grid, training_split_measures

    wanted = training_split_measures("smoke")
    assert {k for k, v in wanted.items() if "training_split" in v} == {c.key for c in thesis_grid("smoke").values()}
    assert {k for k, v in wanted.items() if "budget_row" in v} == {c.key for c in budget_study("smoke").values()}


@pytest.mark.slow
def test_evaluate_caches_the_training_split_and_budget_row_that_the_pages_read(tmp_path, monkeypatch):
    """`tvae evaluate --training-split --budget-row` (what train-all's workers run) leaves entries
    that notebook 03's and 07's calls read back without recomputing."""
    from tvae_core import budget
    from tvae_core.budget import cached_budget_measures
    from tvae_core.cli import main

    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_config(corpus, "mdr", 2.0, max_steps=4)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(cfg.to_dict()))
    runs = tmp_path / "runs"
    assert main(["evaluate", "--config", str(config_path), "--profile", "smoke", "--runs-dir", str(runs), "--quiet",
                 "--json", "--training-split", "--budget-row"]) == 0
    run = train_or_load(cfg, runs, progress=False)
    assert len(list(run.path.glob("training-split-aggregate-*.json"))) == 1
    assert len(list(run.path.glob("budget-row-*.json"))) == 1

    def recomputing(*args, **kwargs):
        raise AssertionError("recomputed a cached entry")

    monkeypatch.setattr(training_split.est, "self_and_leave_one_out_terms", recomputing)
    monkeypatch.setattr(budget, "budget_measures", recomputing)
    assert training_split_aggregate(run, seed=cfg.train.seed).run_key == cfg.key
    assert cached_budget_measures(run, "smoke", seed=cfg.train.seed)


@pytest.mark.slow
def test_train_all_sends_each_run_to_a_worker_until_everything_the_pages_read_is_cached(tmp_path):
    """cli.pending_runs, train-all's decision: an untrained run and a run whose extra measure is
    missing go to a worker, longest first; a run with its evaluation and every wanted measure
    cached does not; without --evaluate only the untrained run does."""
    from tvae_core.cli import main, pending_runs

    corpus = write_corpus(tmp_path / "corpus.txt")
    done = tiny_config(corpus, "mdr", 2.0, max_steps=4)
    partly = tiny_config(corpus, "fb", 2.0, max_steps=4)
    untrained = tiny_config(corpus, "vae", max_steps=6)
    runs, root = {"done": done, "partly": partly, "untrained": untrained}, tmp_path / "runs"
    for cfg in (done, partly):
        path = tmp_path / f"{cfg.key}.json"
        path.write_text(json.dumps(cfg.to_dict()))
        assert main(["evaluate", "--config", str(path), "--profile", "smoke", "--runs-dir", str(root), "--quiet",
                     "--json", "--training-split"]) == 0
    measures = {done.key: {"training_split"}, partly.key: {"training_split", "budget_row"}}
    to_do, trained, evaluated = pending_runs(runs, root, "smoke", evaluate=True, measures=measures)
    assert (trained, evaluated) == ({"done", "partly"}, {"done"})
    assert list(to_do) == ["untrained", "partly"]            # 6 steps before 4
    to_do, _, _ = pending_runs(runs, root, "smoke", evaluate=False, measures=measures)
    assert list(to_do) == ["untrained"]
    (entry,) = (root / done.key).glob("training-split-aggregate-*.json")
    entry.unlink()                                            # a measure the pages read is gone
    assert "done" in pending_runs(runs, root, "smoke", evaluate=True, measures=measures)[0]


def test_train_all_trains_each_budget_family_in_one_process_longest_first():
    """cli.training_groups on the default profile's 33 runs: each budget-study run shorter than
    its method's longest budget rides with it (FB 32 @ 3000 publishes FB 32 and FB 32 @ 600 on the
    way), every other run is a group of its own, every run is in exactly one group, and the
    groups stay longest first."""
    from tvae_core.cli import training_groups
    from tvae_core.experiments import all_book_runs
    from tvae_core.train import is_prefix_of

    runs = all_book_runs("default")
    to_do = dict(sorted(runs.items(), key=lambda item: -item[1].train.max_steps))
    groups = training_groups(to_do)
    assert sorted(label for group in groups for label in group) == sorted(runs)
    shared = {tuple(group) for group in groups if len(group) > 1}
    assert shared == {("FB 32 @ 3000", "FB 32", "FB 32 @ 600"), ("MDR 32 @ 3000", "MDR 32", "MDR 32 @ 600"),
                      ("VAE", "VAE @ 600"), ("AE", "AE @ 600"), ("FB 8", "FB 8 @ 600"), ("MDR 8", "MDR 8 @ 600")}
    for group in groups:
        assert all(is_prefix_of(to_do[label], to_do[group[0]]) for label in group[1:])
    firsts = [to_do[group[0]].train.max_steps for group in groups]
    assert firsts == sorted(firsts, reverse=True)
    # a cyclical run passes through no shorter run: its beta's cycle length is max_steps / cycles
    cyc = runs["CYC-FB 8"]
    assert not is_prefix_of(cyc.replace(train={"max_steps": 600}, label="x"), cyc)


@pytest.mark.slow
def test_evaluate_with_a_snapshot_trains_once_and_reports_both_runs(tmp_path, capsys):
    from tvae_core.cli import main
    from tvae_core.runs import load_run

    corpus = write_corpus(tmp_path / "corpus.txt")
    long = tiny_config(corpus, "fb", 2.0, max_steps=8)
    short = long.replace(train={"max_steps": 5}, label="tiny-fb @ 5")
    paths = []
    for cfg in (long, short):
        paths.append(tmp_path / f"{cfg.key}.json")
        paths[-1].write_text(json.dumps(cfg.to_dict()))
    root = tmp_path / "runs"
    assert main(["evaluate", "--config", str(paths[0]), "--snapshot", str(paths[1]), "--profile", "smoke",
                 "--runs-dir", str(root), "--quiet", "--json", "--training-split"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["label"] for r in reports] == ["tiny-fb", "tiny-fb @ 5"]
    snapshot = load_run(short, root)
    assert snapshot.meta["snapshot_of"] == long.key and len(snapshot.history["train"]) == 5
    assert len(list(snapshot.path.glob("training-split-aggregate-*.json"))) == 1


@pytest.mark.slow
def test_train_all_trains_and_measures_every_book_run_in_two_persistent_workers(tmp_path, capsys, monkeypatch):
    """`tvae train-all --evaluate` end to end on the smoke profile: two worker processes, each
    kept for all its groups, leave every book run trained, evaluated and measured (nothing left
    pending), one report line per run and no failure; run again, it has nothing to do."""
    from tvae_core.cli import main, pending_runs
    from tvae_core.experiments import all_book_runs, training_split_measures

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # train-all sets them for its workers
        monkeypatch.setenv(name, "1")
    argv = ["train-all", "--profile", "smoke", "--workers", "2", "--evaluate", "--runs-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    runs = all_book_runs("smoke")
    to_do, trained, evaluated = pending_runs(runs, tmp_path, "smoke", evaluate=True,
                                             measures=training_split_measures("smoke"))
    assert not to_do and trained == evaluated == set(runs)
    assert out.count('{"label": ') == len(runs) and "FAILED" not in out
    assert main(argv) == 0
    assert f"{len(runs)} trained, 0 to train, {len(runs)} evaluated" in capsys.readouterr().out


def test_a_worker_reports_exit_status_and_output_of_a_failing_command(tmp_path):
    """cli.run_in_worker, what train-all's workers run per group: a bad parameter is exit status 2
    with the one-line message on its stderr; nothing escapes to the caller."""
    from tvae_core.cli import run_in_worker

    code, out, err = run_in_worker(["train", "--config", str(tmp_path / "missing.json"), "--quiet"])
    assert code == 2 and out == "" and "error:" in err and "missing.json" in err
    code, _, err = run_in_worker(["train", "--no-such-option"])
    assert code == 2 and "unrecognized arguments" in err


def test_a_worker_slot_keeps_its_process_and_replaces_one_that_died():
    """train-all's worker slot: calls run in one process kept between them; a process that dies
    fails that call only (exit status -1, the reason on stderr) and the next call gets a new one."""
    import os

    from tvae_core.cli import WorkerSlot

    slot = WorkerSlot()
    try:
        first, again = slot.run(os.getpid), slot.run(os.getpid)
        assert first == again != os.getpid() and slot.started == 1
        code, out, err = slot.run(os._exit, 3)
        assert code == -1 and out == "" and "the worker process died" in err
        assert slot.run(os.getpid) not in (first, os.getpid()) and slot.started == 2
    finally:
        slot.close()
