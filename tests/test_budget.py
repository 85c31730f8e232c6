"""The training-budget study (issue 18): its configs, the reconstruction accuracy, its script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvae_core.budget import budget_table, reconstruction_accuracy
from tvae_core.experiments import BUDGET_METHODS, budget_study, thesis_grid
from tvae_core.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]


def test_budget_study_builds_one_distinct_run_per_method_and_budget():
    profile = get_profile("smoke")
    runs = budget_study("smoke")
    budgets = profile.training.budget_steps
    longest = profile.training.budget_longest
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
    assert profile.training.max_steps in profile.training.budget_steps
    grid = thesis_grid("default")
    study = budget_study("default")
    for label in ("VAE", "AE", "FB 8", "FB 32", "MDR 8", "MDR 32"):
        assert study[f"{label} @ {profile.training.max_steps}"].key == grid[label].key, label


def test_budget_study_refuses_an_unknown_longest_run():
    from dataclasses import replace

    smoke = get_profile("smoke")
    bad = replace(smoke, training=replace(smoke.training, budget_longest=("FB 9",)))
    with pytest.raises(ValueError, match="training.budget_longest"):
        budget_study(bad)


def _tiny_model():
    from tvae_core.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from tvae_core.data import Vocabulary, train_word_tokenizer
    from tvae_core.train import build_model

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


def _row(objective, target, steps, mi, ceiling, at_ceiling):
    test = {"rate": 10.0, "distortion": 90.0, "elbo": -100.0, "iw_log_likelihood": -95.0, "iw_num_samples": 8,
            "iw_num_sentences": 4, "mutual_information": mi, "mutual_information_ceiling": ceiling,
            "mutual_information_at_ceiling": at_ceiling, "marginal_kl": 10.0 - mi, "active_units": 3}
    train = {"mutual_information": mi, "mutual_information_ceiling": ceiling, "mutual_information_at_ceiling": at_ceiling,
             "marginal_kl": 10.0 - mi, "marginal_kl_floor": 10.0 - ceiling, "marginal_kl_at_floor": at_ceiling}
    recon = {"token_accuracy": 0.5}
    return {"objective": objective, "target_rate": target, "steps": steps, "test": test, "train_split": train,
            "reconstruction": recon, "reconstruction_from_prior_mean": recon, "train_seconds": 12.0,
            "seconds_per_step": 0.05}


def test_budget_table_orders_rows_and_prints_values_at_their_limits_as_bounds():
    rows = [_row("mdr", 32.0, 3000, 8.2, 8.23, True), _row("vae", None, 600, 0.01, 8.23, False),
            _row("mdr", 32.0, 600, 0.5, 8.23, False)]
    lines = budget_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["VAE", "MDR 32", "MDR 32"]
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["600", "600", "3000"]
    assert ">= 8.20 (ceiling 8.23)" in lines[-1] and "(floor" in lines[-1]
    assert "ceiling" not in lines[2] and "floor" not in lines[2]


@pytest.mark.slow
def test_budget_study_script_writes_the_table_in_the_smoke_profile(tmp_path):
    """The script end to end on the smoke profile's shortest budget (6 runs, two at a time)."""
    output = tmp_path / "budget.md"
    budget = get_profile("smoke").training.budget_steps[0]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "budget_study.py"), "--profile", "smoke",
         "--max-steps", str(budget), "--runs-dir", str(tmp_path / "runs"), "--output", str(output)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in output.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(BUDGET_METHODS)
    assert all(f"| {budget} |" in row for row in rows)
    stored = list((tmp_path / "runs").glob("*/budget-row-v*.json"))
    assert len(stored) == len(BUDGET_METHODS)
    assert json.loads(stored[0].read_text())["steps"] == budget
