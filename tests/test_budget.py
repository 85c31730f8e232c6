"""The training-budget study (issue 18): its configs, the reconstruction accuracy, its script."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvae_core.budget import reconstruction_accuracy
from tvae_core.budget_report import budget_table
from tvae_core.data import collate
from tvae_core.experiments import BUDGET_METHODS, budget_study, thesis_grid
from tvae_core.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]


def test_budget_study_builds_one_distinct_run_per_method_and_budget():
    profile = get_profile("smoke")
    runs = budget_study("smoke")
    budgets = profile.budget_steps
    longest = profile.budget_longest
    assert longest, "the smoke profile should exercise budget_longest"
    assert len(runs) == len(BUDGET_METHODS) * (len(budgets) - 1) + len(longest)
    assert {label for label in runs if label.endswith(f" @ {max(budgets)}")} == {f"{r} @ {max(budgets)}" for r in longest}
    assert len({cfg.key for cfg in runs.values()}) == len(runs)
    assert {cfg.train.max_steps for cfg in runs.values()} == set(budgets)
    # one warm-up for every budget, so a shorter run replays the first steps of a longer one
    assert len({cfg.train.lr_warmup_steps for cfg in runs.values()}) == 1
    for label, cfg in runs.items():
        assert cfg.label == label and label.endswith(f" @ {cfg.train.max_steps}")
    methods = {(cfg.objective.name, cfg.objective.target_rate) for cfg in runs.values()}
    assert methods == {("vae", None), ("ae", None), ("fb", 8.0), ("fb", 32.0), ("mdr", 8.0), ("mdr", 32.0)}
    # the same method at two budgets differs in max_steps only
    a, b = runs[f"MDR 32 @ {budgets[0]}"], runs[f"MDR 32 @ {budgets[1]}"]
    assert a.replace(train={"max_steps": b.train.max_steps}, label=b.label) == b


def test_budget_study_shares_the_book_profiles_own_budget_with_the_grid():
    """At the default profile's own budget the study's runs are the grid's (one cache entry each),
    so the study costs only its other budgets."""
    profile = get_profile("default")
    assert profile.train.max_steps in profile.budget_steps
    grid = thesis_grid("default")
    study = budget_study("default")
    for label in ("VAE", "AE", "FB 8", "FB 32", "MDR 8", "MDR 32"):
        assert study[f"{label} @ {profile.train.max_steps}"].key == grid[label].key, label


def test_budget_study_refuses_an_unknown_longest_run():
    from dataclasses import replace

    smoke = get_profile("smoke")
    bad = replace(smoke, budget_longest=("FB 9",))
    with pytest.raises(ValueError, match="Profile.budget_longest"):
        budget_study(bad)


def _tiny_model():
    from tvae_core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from tvae_core.data import Vocabulary, train_word_tokenizer
    from tvae_core.build import build_model

    sentences = ["the cat sat on the mat", "a dog ran", "the dog sat on a log", "a cat ran on the mat"]
    vocab = Vocabulary.from_word_tokenizer(train_word_tokenizer(sentences, 40))
    torch.manual_seed(0)
    config = RunConfig(data=DataConfig(max_length=24),
                       model=ModelConfig(hidden_size=16, num_layers=1, num_heads=2, latent_dim=4, dropout=0.0),
                       train=TrainConfig())
    model = build_model(config, vocab).eval()
    sequences = [[vocab.bos_id, *vocab.encode(s), vocab.eos_id] for s in sentences]
    return model, vocab, sequences


def test_reconstruction_accuracy_counts_matching_positions():
    model, vocab, sequences = _tiny_model()
    targets = [s[1:] for s in sequences]
    n_tokens = sum(len(t) for t in targets)

    # a decoder that reproduces every sentence: accuracy 1
    model.generate = lambda z, max_new_tokens, greedy: [list(t) for t in targets[: z.shape[0]]]
    exact = reconstruction_accuracy(model, sequences, vocab.pad_id)
    assert (exact.token_accuracy, exact.sentence_accuracy, exact.num_tokens) == (1.0, 1.0, n_tokens)

    # one that drops each sentence's last token ([EOS]) and appends two extra ones: the missing
    # position is wrong, the extras cost nothing in token accuracy, no sentence is exact
    model.generate = lambda z, max_new_tokens, greedy: [list(t[:-1]) + [7, 7] for t in targets[: z.shape[0]]]
    cut = reconstruction_accuracy(model, sequences, vocab.pad_id)
    assert cut.token_accuracy == pytest.approx((n_tokens - len(targets)) / n_tokens)
    assert cut.sentence_accuracy == 0.0


def test_reconstruction_accuracy_on_a_tiny_model_decodes_greedily_from_the_posterior_mean():
    model, vocab, sequences = _tiny_model()
    first = reconstruction_accuracy(model, sequences, vocab.pad_id, batch_size=3)
    again = reconstruction_accuracy(model, sequences, vocab.pad_id, batch_size=2)
    assert first == again  # deterministic (greedy, z = posterior mean) and independent of batching
    assert 0.0 <= first.token_accuracy <= 1.0 and first.num_sentences == len(sequences)
    prior = reconstruction_accuracy(model, sequences, vocab.pad_id, from_prior_mean=True)
    assert 0.0 <= prior.token_accuracy <= 1.0
    with pytest.raises(ValueError, match="exclusive"):
        reconstruction_accuracy(model, sequences, vocab.pad_id, from_prior_mean=True, from_other_sentence=True)


def test_the_other_sentence_baseline_decodes_each_sentence_from_the_next_ones_code():
    """Sentence i is decoded from the posterior mean of sentence i + 1 (the last from the first's),
    whatever the batching: the decoder sees exactly the codes the encoder gives, shifted by one."""
    model, vocab, sequences = _tiny_model()
    with torch.no_grad():
        codes = torch.cat([model.encode(collate([s], vocab.pad_id)).loc for s in sequences])   # [N, D]
    seen = []

    def record(z, max_new_tokens, greedy):
        seen.append(z.clone())
        return [[vocab.eos_id]] * z.shape[0]

    model.generate = record
    for batch_size in (1, 3):
        seen.clear()
        reconstruction_accuracy(model, sequences, vocab.pad_id, from_other_sentence=True, batch_size=batch_size)
        torch.testing.assert_close(torch.cat(seen), codes.roll(-1, dims=0), atol=1e-5, rtol=0)


def test_a_reconstruction_gain_is_judged_by_its_paired_standard_error():
    """Per sentence of 10 tokens: own reconstructions match [3, 5, 4, 4], another sentence's code
    [1, 4, 2, 3]: gain per sentence [2, 1, 2, 1], mean 1.5 tokens (sd 0.577), so the token-accuracy
    gain is 0.15 with error 0.577 / 2 / 10 = 0.0289. Counted by position, the gain is exactly the
    accuracies' difference."""
    from tvae_core.budget import ReconstructionAccuracy

    def recon(counts):
        return ReconstructionAccuracy(token_accuracy=sum(counts) / 40, sentence_accuracy=0.0, num_sentences=4,
                                      num_tokens=40, correct_per_sentence=tuple(counts))

    own, other = recon([3, 5, 4, 4]), recon([1, 4, 2, 3])
    gain = own.gain_over(other)
    assert gain.mean == pytest.approx(own.token_accuracy - other.token_accuracy) == pytest.approx(0.15)
    assert gain.standard_error == pytest.approx(math.sqrt(1 / 3) / 2 / 10)
    assert gain.ordering() == "b below a"
    # the same accuracies, but the gain on one sentence only: within two paired standard errors
    lopsided = recon([9, 3, 2, 2]).gain_over(recon([3, 3, 2, 2]))
    assert lopsided.mean == pytest.approx(0.15) and lopsided.ordering() == "not separable"
    with pytest.raises(ValueError, match="not the same sentences"):
        own.gain_over(ReconstructionAccuracy(token_accuracy=0.1, sentence_accuracy=0.0, num_sentences=4,
                                             num_tokens=41, correct_per_sentence=(1, 1, 1, 1)))


def test_reconstruction_counts_each_sentences_matching_positions():
    model, vocab, sequences = _tiny_model()
    targets = [s[1:] for s in sequences]
    model.generate = lambda z, max_new_tokens, greedy: [list(t[:-1]) for t in targets[: z.shape[0]]]
    cut = reconstruction_accuracy(model, sequences, vocab.pad_id)   # one batch: the stub answers in order
    assert cut.correct_per_sentence == tuple(len(t) - 1 for t in targets)
    assert sum(cut.correct_per_sentence) / cut.num_tokens == cut.token_accuracy


def _row(objective, target, steps, mi, ceiling, at_ceiling):
    test = {"rate": 10.0, "distortion": 90.0, "elbo": -100.0, "iw_log_likelihood": -95.0, "iw_num_samples": 8,
            "iw_num_sentences": 4, "mutual_information": mi, "mutual_information_ceiling": ceiling,
            "mutual_information_at_ceiling": at_ceiling, "marginal_kl": 10.0 - mi, "active_units": 3}
    train = {"mutual_information": mi, "mutual_information_ceiling": ceiling, "mutual_information_at_ceiling": at_ceiling,
             "marginal_kl": 10.0 - mi, "marginal_kl_floor": 10.0 - ceiling, "marginal_kl_at_floor": at_ceiling}
    recon = {"token_accuracy": 0.5}
    return {"objective": objective, "target_rate": target, "steps": steps, "test": test, "train_split": train,
            "reconstruction": recon, "reconstruction_from_prior_mean": recon,
            "reconstruction_from_other_sentence": recon, "train_seconds": 12.0,
            "seconds_per_step": 0.05}


def test_budget_table_orders_rows_and_prints_values_at_their_limits_as_bounds():
    rows = [_row("mdr", 32.0, 3000, 8.2, 8.23, True), _row("vae", None, 600, 0.01, 8.23, False),
            _row("mdr", 32.0, 600, 0.5, 8.23, False)]
    # the table's rate is the whole split's analytic one; the aggregate estimator's Monte Carlo rate
    # (MI + KL = 10.00) differs from it, and the floor is the latter's
    rows[0]["test"]["rate"] = 10.15
    lines = budget_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["VAE", "MDR 32", "MDR 32"]
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["600", "600", "3000"]
    # MI at its ceiling log N is a lower bound; the marginal KL (10.00 - 8.20) at its floor
    # R^ - log N = 10.00 - 8.23 an upper one, on the test and the training split alike
    assert ">= 8.20 (ceiling 8.23)" in lines[-1]
    assert lines[-1].count("<= 1.80 (floor 1.77)") == 2
    assert "ceiling" not in lines[2] and "floor" not in lines[2]


@pytest.mark.slow
def test_budget_study_script_writes_the_table_in_the_smoke_profile(tmp_path):
    """The script end to end on the smoke profile's shortest budget (6 runs, two at a time)."""
    output = tmp_path / "budget.md"
    budget = get_profile("smoke").budget_steps[0]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "budget_study.py"), "--profile", "smoke",
         "--max-steps", str(budget), "--runs-dir", str(tmp_path / "runs"), "--output", str(output)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in output.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(BUDGET_METHODS)
    assert all(f"| {budget} |" in row for row in rows)
    stored = list((tmp_path / "runs").glob("*/budget-row-*.json"))
    assert len(stored) == len(BUDGET_METHODS)
    assert json.loads(stored[0].read_text())["payload"]["steps"] == budget


class _FakeRun:
    """What the row cache needs of a run: its folder and its config's key."""

    def __init__(self, path, key="run-key"):
        from types import SimpleNamespace

        self.path = path
        self.config = SimpleNamespace(key=key)


def _counting_measures(monkeypatch):
    import tvae_core.budget as budget

    calls = []

    def fake(run, profile, *, progress=False, seed=0, recon_sentences=200):
        calls.append(run.config.key)
        return {"run_key": run.config.key, "steps": 10, "rate": 1.5 * len(calls)}

    monkeypatch.setattr(budget, "budget_measures", fake)
    return calls


def test_cached_budget_measures_stores_the_row_next_to_the_run_and_reads_it_back(tmp_path, monkeypatch):
    from tvae_core.budget import budget_row_path, cached_budget_measures, load_budget_row

    calls = _counting_measures(monkeypatch)
    run = _FakeRun(tmp_path)
    first = cached_budget_measures(run, "smoke")
    assert budget_row_path(tmp_path, "run-key", "smoke").is_file()
    assert cached_budget_measures(run, "smoke") == first and len(calls) == 1   # a hit: not measured again
    assert load_budget_row(tmp_path, "run-key", "smoke") == first
    # another seed is another row; another run's key never reads this one
    cached_budget_measures(run, "smoke", seed=1)
    assert len(calls) == 2
    assert load_budget_row(tmp_path, "other-key", "smoke") is None
    assert not list(tmp_path.glob("*.tmp-*"))   # published atomically, no staging file left


def test_a_damaged_budget_row_is_set_aside_and_measured_again(tmp_path, monkeypatch, caplog):
    from tvae_core.budget import budget_row_path, cached_budget_measures

    calls = _counting_measures(monkeypatch)
    run = _FakeRun(tmp_path)
    first = cached_budget_measures(run, "smoke")
    path = budget_row_path(tmp_path, "run-key", "smoke")
    path.write_text(path.read_text().replace('"rate": 1.5', '"rate": 9.5'))   # content changed
    with caplog.at_level("WARNING"):
        again = cached_budget_measures(run, "smoke")
    assert len(calls) == 2 and again != first and again["rate"] == 3.0
    assert list(tmp_path.glob(f"{path.name}.damaged-*")) and path.name in caplog.text
    path.write_text("{not json")                                            # unreadable
    cached_budget_measures(run, "smoke")
    assert len(calls) == 3


def _study_row(objective, target, steps, *, rate, elbo=-100.0, mi=2.0, mi_at_ceiling=False, kl=1.0,
               kl_at_floor=False, recon=0.06, recon_prior=0.03, recon_other=0.03):
    name = {"vae": "VAE", "ae": "AE", "fb": "FB", "mdr": "MDR"}[objective]
    label = f"{name} @ {steps}" if target is None else f"{name} {target:g} @ {steps}"
    return {"label": label, "run_key": f"key of {label}", "objective": objective, "target_rate": target, "steps": steps,
            "test": {"rate": rate, "elbo": elbo},
            "train_split": {"mutual_information": mi, "mutual_information_at_ceiling": mi_at_ceiling,
                            "marginal_kl": kl, "marginal_kl_at_floor": kl_at_floor},
            "reconstruction": _recon(recon), "reconstruction_from_prior_mean": _recon(recon_prior),
            "reconstruction_from_other_sentence": _recon(recon_other)}


def _recon(accuracy, num_sentences=100, tokens_each=20):
    """A stored reconstruction with ``accuracy`` of 100 sentences of 20 tokens each, its matching
    positions spread over the sentences (so a paired difference has a nonzero error)."""
    from dataclasses import asdict

    from tvae_core.budget import ReconstructionAccuracy

    total = round(accuracy * num_sentences * tokens_each)
    counts = [total // num_sentences + (1 if i < total % num_sentences else 0) for i in range(num_sentences)]
    return asdict(ReconstructionAccuracy(token_accuracy=accuracy, sentence_accuracy=0.0, num_sentences=num_sentences,
                                         num_tokens=num_sentences * tokens_each, correct_per_sentence=tuple(counts)))


def test_phenomena_table_judges_each_budget_and_never_compares_bounds():
    from tvae_core.budget_report import AT_CEILING, AT_FLOOR, NO, NOT_TRAINED, WITHIN_2SE, YES, phenomena_table

    rows = [
        # 100 steps: every run; FB under both targets, MDR on both, the VAE collapsed
        _study_row("vae", None, 100, rate=0.01, recon=0.02, recon_prior=0.02, recon_other=0.02),
        _study_row("ae", None, 100, rate=60.0),
        _study_row("fb", 8.0, 100, rate=6.0, elbo=-120.0, mi=2.0, kl=4.0),
        _study_row("fb", 32.0, 100, rate=27.0, elbo=-140.0, mi=5.0, kl=22.0),
        _study_row("mdr", 8.0, 100, rate=8.3, elbo=-121.0, mi=6.0, kl=2.0),
        _study_row("mdr", 32.0, 100, rate=40.0, elbo=-150.0, mi=5.5, kl=30.0),   # 25 % over: off target
        # 200 steps: only the target-32 runs; MDR's MI and KL at their limits, FB 32 on target
        _study_row("fb", 32.0, 200, rate=30.0, elbo=-130.0, mi=8.0, kl=21.0),
        _study_row("mdr", 32.0, 200, rate=32.5, elbo=-131.0, mi=10.6, mi_at_ceiling=True, kl=22.0,
                   kl_at_floor=True, recon=0.05, recon_prior=0.01, recon_other=0.06),   # beats z = 0, not another code
    ]

    def group(kl, se):
        return {"marginal_kl": kl, "marginal_kl_se": se}

    def fit(**groups):   # budget_mmm_by_steps's result: groups by the study's label, and their run keys
        return {"groups": groups, "run_keys": {label: f"key of {label}" for label in groups}}

    mmm = {100: fit(**{"FB 8 @ 100": group(4.0, 0.1), "MDR 8 @ 100": group(2.0, 0.1),
                       "FB 32 @ 100": group(20.0, 0.3), "MDR 32 @ 100": group(20.5, 0.3)}),
           200: fit(**{"FB 32 @ 200": group(12.0, 0.4), "MDR 32 @ 200": group(7.0, 0.3)})}
    table = {p.key: p for p in phenomena_table(rows, mmm, collapse_rate=0.5)}
    verdicts = {key: (p.verdicts[100], p.verdicts[200]) for key, p in table.items()}
    assert verdicts == {
        "vae_collapsed": (YES, NOT_TRAINED),
        "fb8_below_target": (YES, NOT_TRAINED), "fb32_below_target": (YES, NO),
        "mdr8_on_target": (YES, NOT_TRAINED), "mdr32_on_target": (NO, YES),
        "fb_elbo_worse": (YES, NOT_TRAINED), "mdr_elbo_worse": (YES, NOT_TRAINED),
        "fb_mi_grows": (YES, NOT_TRAINED), "mdr_mi_grows": (NO, NOT_TRAINED),
        "mdr_below_fb_mmm_8": (YES, NOT_TRAINED), "mdr_below_fb_mmm_32": (WITHIN_2SE, YES),
        "mdr_below_fb_aggregate_8": (YES, NOT_TRAINED), "mdr_below_fb_aggregate_32": (NO, AT_FLOOR),
        "recon_above_baseline": (YES, NO),
    }
    assert table["mdr32_on_target"].holds_from() == 200
    assert table["mdr_below_fb_mmm_32"].holds_from() == 200
    assert table["vae_collapsed"].holds_from() == 100         # "not trained" later does not undo it
    assert table["fb32_below_target"].holds_from() is None     # it stops holding
    assert "within 10%" in table["mdr8_on_target"].name       # the book's one tolerance by default
    with pytest.raises(ValueError, match="two"):
        phenomena_table([r for r in rows if r["target_rate"] in (None, 32.0)], mmm)
    # a run shared with the grid keeps the grid's label ("MDR 8", not "MDR 8 @ 100"): its row still
    # finds its MMM group, by run key
    relabelled = [dict(r, label=r["label"].split(" @ ")[0]) for r in rows]
    assert {p.key: p for p in phenomena_table(relabelled, mmm)}["mdr_below_fb_mmm_8"].verdicts == {100: YES, 200: NOT_TRAINED}
    # a budget without an MMM fit is not compared
    assert {p.key: p for p in phenomena_table(rows, {200: mmm[200]})}["mdr_below_fb_mmm_32"].verdicts == {
        100: NOT_TRAINED, 200: YES}
    # the at-ceiling verdict: MI compared only when neither value is at its ceiling
    capped = [dict(r, train_split=dict(r["train_split"], mutual_information_at_ceiling=True))
              if r["label"] == "FB 8 @ 100" else r for r in rows]
    assert {p.key: p for p in phenomena_table(capped, mmm)}["fb_mi_grows"].verdicts[100] == AT_CEILING
