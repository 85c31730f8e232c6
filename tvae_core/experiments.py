"""The runs of the book, named once: the thesis grid and the collapse study.

Every notebook asks for runs through these functions, so two notebooks that need "FB at 16
nats" get the same config, hence the same cache entry, and nothing is trained twice.
"""
from __future__ import annotations

import math

from .config import RunConfig
from .methods import get_method
from .pretrained.fine_tuning import pretrained_config
from .pretrained.weights import DEFAULT_DECODER, DEFAULT_ENCODER
from .profiles import Profile, get_profile

# the methods of the thesis grid that take a target rate (registry labels), in the book's order
TARGETED_METHODS = tuple(m for m in ("FB", "MDR", "CYC-FB") if get_method(m).takes_target)
# The damping c of the book's MDR runs (objectives.mdr_loss): plain MDR (c = 0) falls into a limit
# cycle on the default profile (rate swinging 0 <-> 100+ nats); c = 0.1 and c = 1 both held the
# rate of MDR 16 at 16.2 and 16.7 nats from ~100 steps on (measured, 600 steps); the smaller is used.
MDR_DAMPING = 0.1
# The thesis code's multiplier (thesis_code.md section 2.5): lambda_0 = softplus(0) = ln 2, RMSprop
# at lr 5e-5 (its default; the runs' value is unknown), the multiplier seeing an EMA (0.5) of the rate
THESIS_MDR = {"mdr_lambda_init": math.log(2.0), "mdr_lr": 5e-5, "mdr_optimizer": "rmsprop", "mdr_rate_ema": 0.5,
              "mdr_damping": 0.0}


def warmup_steps(profile: str | Profile) -> int:
    """The profile's learning-rate warm-up (steps): its own, else a tenth of its budget, at most 100."""
    return (get_profile(profile) if isinstance(profile, str) else profile).train.lr_warmup_steps


def base_config(profile: str | Profile, seed: int = 0) -> RunConfig:
    """The profile's data, model and training settings with the plain VAE objective
    (:meth:`tvae_core.profiles.Profile.base_config`)."""
    return (get_profile(profile) if isinstance(profile, str) else profile).base_config(seed)


def method_config(method: str, profile: str | Profile, target_rate: float | None = None, seed: int = 0,
                  free_bits_variant: str = "example_dim", beta: float | None = None) -> RunConfig:
    """The config of one method of the registry (its label, ``"CYC-FB"``, or its name, ``"cyc_fb"``):
    ``target_rate`` in nats for the methods that take one, ``free_bits_variant`` and ``beta`` for
    the methods that read them (:attr:`tvae_core.methods.Method.reads`)."""
    m = get_method(method)
    if m.takes_target and target_rate is None:
        raise ValueError(f"method={method!r} needs target_rate (nats)")
    objective = {"name": m.name, "target_rate": target_rate if m.takes_target else None}
    label = m.label if target_rate is None or not m.takes_target else f"{m.label} {target_rate:g}"
    if "free_bits_variant" in m.reads:
        objective["free_bits_variant"] = free_bits_variant
        if free_bits_variant != "example_dim":
            label += f" ({free_bits_variant})"
    if "beta" in m.reads:
        objective["beta"] = 1.0 if beta is None else beta
        label += f" {objective['beta']:g}"
    if m is get_method("MDR"):
        objective["mdr_damping"] = MDR_DAMPING
    model = {"injection": m.injection} if m.injection is not None else {}
    return base_config(profile, seed).replace(objective=objective, model=model, label=label)


def thesis_grid(profile: str | Profile, seed: int = 0,
                targeted_methods: tuple[str, ...] = TARGETED_METHODS) -> dict[str, RunConfig]:
    """VAE, AE, CYC, and each of ``targeted_methods`` (registry labels or names of methods that
    take a target rate; the thesis's FB / MDR / CYC-FB by default) at every target rate of the
    profile (label -> config)."""
    p = get_profile(profile) if isinstance(profile, str) else profile
    runs = {m: method_config(m, p, seed=seed) for m in ("VAE", "AE", "CYC")}
    for method in targeted_methods:
        for rate in p.target_rates:
            cfg = method_config(method, p, rate, seed)
            runs[cfg.label] = cfg
    return runs


def free_bits_variants(profile: str | Profile, target_rate: float, seed: int = 0) -> dict[str, RunConfig]:
    """FB at one target rate in its three variants (the example_dim one is shared with the grid)."""
    return {v: method_config("FB", profile, target_rate, seed, free_bits_variant=v)
            for v in ("example_dim", "batch_dim", "total")}


def undamped_mdr(profile: str | Profile, target_rate: float, seed: int = 0) -> RunConfig:
    """MDR as published (no damping term): the comparison for the damped runs of the grid."""
    cfg = method_config("MDR", profile, target_rate, seed)
    return cfg.replace(objective={"mdr_damping": 0.0}, label=f"{cfg.label} (undamped)")


def thesis_mdr(profile: str | Profile, target_rate: float, seed: int = 0) -> RunConfig:
    """MDR with the thesis code's multiplier (:data:`THESIS_MDR`): the comparison for the book's
    MDR, whose multiplier moves by SGD at a larger rate and whose rate is damped."""
    cfg = method_config("MDR", profile, target_rate, seed)
    return cfg.replace(objective=THESIS_MDR, label=f"{cfg.label} (thesis)")


# The thesis's decoder input dropout ("DROP 40", thesis_code.md section 1.3): p = 0.4. The thesis
# zeroes a dropped word's embedding; the book replaces the word by [UNK] (Bowman et al., 2016).
THESIS_WORD_DROPOUT = 0.4


def collapse_study(profile: str | Profile, word_dropouts=(THESIS_WORD_DROPOUT, 1.0),
                   seed: int = 0) -> dict[str, RunConfig]:
    """The plain VAE with the full autoregressive decoder, weakened decoders (word dropout, by
    default the thesis's p and p = 1, a decoder that sees no previous word) and the decoder-only
    LM; labels "VAE", "VAE, word dropout {p:g}" and "LM"."""
    runs = {"VAE": method_config("VAE", profile, seed=seed)}
    for rate in word_dropouts:
        cfg = runs["VAE"].replace(model={"word_dropout": rate}, label=f"VAE, word dropout {rate:g}")
        runs[cfg.label] = cfg
    runs["LM"] = method_config("LM", profile, seed=seed)
    return runs


def pretrained_study(profile: str | Profile, seed: int = 0, target_rate: float | None = None,
                     encoder: str = DEFAULT_ENCODER, decoder: str = DEFAULT_DECODER) -> dict[str, RunConfig]:
    """The plain VAE, FB and MDR at ``target_rate`` nats (default: the profile's second target
    rate) with a pretrained encoder and decoder (label -> config), sized by ``Profile.pretrained``
    (notebook 06; evaluated by :func:`tvae_core.evaluation.evaluate_run` with
    ``Profile.pretrained.estimators``)."""
    p = get_profile(profile) if isinstance(profile, str) else profile
    size = p.pretrained
    target = target_rate if target_rate is not None else p.target_rates[min(1, len(p.target_rates) - 1)]
    runs = {}
    for method, rate in (("VAE", None), ("FB", target), ("MDR", target)):
        cfg = pretrained_config(method_config(method, p, rate, seed), encoder, decoder)
        cfg = cfg.replace(
            data={"max_train_sentences": size.max_train_sentences, "max_eval_sentences": size.max_eval_sentences,
                  "max_test_sentences": size.max_eval_sentences},
            model={"latent_dim": size.latent_dim},
            train={"max_steps": size.max_steps, "batch_size": size.batch_size, "eval_every": size.max_steps,
                   "checkpoint_every": max(1, min(size.max_steps, 50)),
                   "lr_warmup_steps": min(100, max(1, size.max_steps // 10))},
            label=f"{cfg.label} (pretrained)")
        runs[cfg.label] = cfg
    return runs


BUDGET_METHODS = (("VAE", None), ("AE", None), ("FB", 8.0), ("FB", 32.0), ("MDR", 8.0), ("MDR", 32.0))


def budget_study(profile: str | Profile, seed: int = 0) -> dict[str, RunConfig]:
    """VAE, AE, FB 8, FB 32, MDR 8 and MDR 32 at every budget of ``Profile.budget_steps``
    (label -> config, e.g. "MDR 32 @ 3000"; the method, target and budget stay in the config);
    at the longest budget only the runs named in ``Profile.budget_longest`` (all when empty).

    Every budget uses the same warm-up, at most a tenth of the smallest budget: the learning rate
    is then the same function of the step for all budgets (constant after warm-up) and batches and
    noise are seeded per step, so a shorter run replays the first steps of a longer one exactly
    (:func:`tvae_core.train.is_prefix_of`). Each budget is its own cached run, and the one at the
    profile's own budget is the grid's run (same key); ``tvae train-all`` trains each method once,
    to its longest budget, and publishes the shorter budgets on the way (snapshots, byte for byte
    the runs trained alone: tests/test_training.py), so the study costs its longest budget per
    method rather than the sum of its budgets.
    """
    p = get_profile(profile) if isinstance(profile, str) else profile
    budgets = p.budget_steps
    warmup = min(warmup_steps(p), max(1, min(budgets) // 10))
    longest = set(p.budget_longest)
    unknown = longest - {method_config(m, p, t, seed).label for m, t in BUDGET_METHODS}
    if unknown:
        raise ValueError(f"Profile.budget_longest={sorted(unknown)} names runs the study does not have; "
                         f"accepted labels: {[method_config(m, p, t, seed).label for m, t in BUDGET_METHODS]}")
    runs: dict[str, RunConfig] = {}
    for steps in budgets:
        for method, target in BUDGET_METHODS:
            cfg = method_config(method, p, target, seed)
            if steps == max(budgets) and longest and cfg.label not in longest:
                continue
            cfg = cfg.replace(train={"max_steps": steps, "lr_warmup_steps": warmup}, label=f"{cfg.label} @ {steps}")
            runs[cfg.label] = cfg
    return runs


def training_split_measures(profile: str | Profile, seed: int = 0) -> dict[str, set[str]]:
    """Which runs' cached measures beyond the held-out evaluation the pages read (run key ->
    {"training_split", "budget_row"}): the training split's aggregate estimates of every grid run
    (notebook 03) and the budget row of every budget-study run (notebook 07, which holds the
    training-split estimates too). ``tvae train-all`` computes them in its parallel workers, so
    that no page spends its serial execution on them."""
    wanted: dict[str, set[str]] = {}
    for cfg in thesis_grid(profile, seed).values():
        wanted.setdefault(cfg.key, set()).add("training_split")
    for cfg in budget_study(profile, seed).values():
        wanted.setdefault(cfg.key, set()).add("budget_row")
    return wanted


def all_book_runs(profile: str | Profile, seed: int = 0) -> dict[str, RunConfig]:
    """Every run the book's notebooks train (label -> config), de-duplicated by cache key."""
    p = get_profile(profile) if isinstance(profile, str) else profile
    runs: dict[str, RunConfig] = {}
    middle = p.target_rates[len(p.target_rates) // 2]
    variants = (undamped_mdr(p, middle, seed), thesis_mdr(p, middle, seed))
    for group in (collapse_study(p, seed=seed), thesis_grid(p, seed), free_bits_variants(p, middle, seed),
                  {cfg.label: cfg for cfg in variants}, budget_study(p, seed)):
        for cfg in group.values():
            runs.setdefault(cfg.label, cfg)
    unique = {}
    for label, cfg in runs.items():
        unique.setdefault(cfg.key, (label, cfg))
    return {label: cfg for label, cfg in unique.values()}
