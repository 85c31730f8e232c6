"""The method registry: every method of the book keeps its run key, a new objective is one entry,
and the thesis code's MDR multiplier moves as that code's RMSprop did."""
import math

import pytest
import torch

from helpers import tiny_config, write_corpus
from tvae_core import config as config_module
from tvae_core import plotting, profiles
from tvae_core.config import ObjectiveConfig
from tvae_core.experiments import all_book_runs, method_config, thesis_mdr
from tvae_core.methods import METHODS, Method, compute_loss, get_method, method_of, register_method
from tvae_core.objectives import elbo_loss

# The keys of every run of the book (smoke and default) and of method_config at 16 nats, with the
# training-code hash pinned to "pinned": the code hash moves with any edit of the training modules
# by design (config.py), every other part of the key (config, corpus, cache format) must not move
# unless a config is changed on purpose, since a moved key retrains the run. First computed on the
# tree before the method registry existed; recomputed when the default profile moved to 1,500
# steps, when the budget study and the thesis MDR joined the book's runs, and when the collapse
# study's first word dropout became the thesis's 0.4. The CPU profiles' LM head
# dtype follows the hardware (tvae_core.device.cpu_head_dtype) and is in every key, so each dtype
# has its table: bfloat16 (a CPU with it in hardware) and float32 (elsewhere, first computed when
# the head came to follow the CPU).
KEYS_BFLOAT16_HEAD = {
    'smoke|VAE': '504304345ef945e3',
    'smoke|VAE, word dropout 0.4': '6602909f8bc5ee23',
    'smoke|VAE, word dropout 1': '31c9302a421f3748',
    'smoke|LM': '0c2f34c159ad4a0d',
    'smoke|AE': '7ea67004c527f45d',
    'smoke|CYC': 'af16da4bb12d3749',
    'smoke|FB 2': '0d89ff04487f6fe0',
    'smoke|FB 4': 'b6c80591526702f5',
    'smoke|MDR 2': 'ddc2dfe69c93b5bc',
    'smoke|MDR 4': '5d796e4f6c9ae094',
    'smoke|CYC-FB 2': '2361019bc5ae284c',
    'smoke|CYC-FB 4': '6ed6113a69c22a19',
    'smoke|FB 4 (batch_dim)': '3f67ae13d3f757ba',
    'smoke|FB 4 (total)': '7025b9d4881b7395',
    'smoke|MDR 4 (undamped)': '843ae79898344c11',
    'smoke|MDR 4 (thesis)': '23ffb26f4cfa2fcf',
    'smoke|VAE @ 10': '444c0c0ad9b732f6',
    'smoke|AE @ 10': '54f98de8a980136c',
    'smoke|FB 8 @ 10': 'f1ef462d53edc7dc',
    'smoke|FB 32 @ 10': '5d9eac46387e7659',
    'smoke|MDR 8 @ 10': '779cd30a9c2588a8',
    'smoke|MDR 32 @ 10': '50aff99993ca1e3e',
    'smoke|VAE @ 20': '5fdbc50c2af6baec',
    'smoke|AE @ 20': 'c74f36f6cf26d41b',
    'smoke|FB 8 @ 20': 'c704693ca8160473',
    'smoke|FB 32 @ 20': '53a2a84a2d555881',
    'smoke|MDR 8 @ 20': 'bbfaba6654454da2',
    'smoke|MDR 32 @ 20': '8112ebe28d9d3d5d',
    'smoke|FB 32 @ 30': '476f0096c6906331',
    'smoke|MDR 32 @ 30': '48ebf12d8ff28652',
    'default|VAE': '9f3d9eff1181599d',
    'default|VAE, word dropout 0.4': '3512950910f21afc',
    'default|VAE, word dropout 1': 'f49cf2e97802ed91',
    'default|LM': 'b86b71d6adfe7476',
    'default|AE': '0bae0fe3f1f7522e',
    'default|CYC': 'ae16aa69f3c78a47',
    'default|FB 4': 'e7d5315d6666ac9f',
    'default|FB 8': 'eee20ccd8b24ba5b',
    'default|FB 16': '0bddafeb0b6904c2',
    'default|FB 24': '34c594706ba059cd',
    'default|FB 32': 'd5d63af062d07aaf',
    'default|MDR 4': 'eb0f460728ddb03e',
    'default|MDR 8': 'ca0c58986f68505e',
    'default|MDR 16': '716bd26e56bd2a23',
    'default|MDR 24': '55f9fedcbaefa6e9',
    'default|MDR 32': 'ce3464f22d20b4ac',
    'default|CYC-FB 4': 'a44a0dd01659b24f',
    'default|CYC-FB 8': 'd23bf38c44080204',
    'default|CYC-FB 16': '833f5e67c3bc0dc6',
    'default|CYC-FB 24': 'cce04b70b1a25cb7',
    'default|CYC-FB 32': '80cce784eb5da7e0',
    'default|FB 16 (batch_dim)': '73897926691573cc',
    'default|FB 16 (total)': 'a5efc5a6c4200bc5',
    'default|MDR 16 (undamped)': '6031d1f40cbf0b5b',
    'default|MDR 16 (thesis)': '9e62458e432f39a9',
    'default|VAE @ 600': '2bdbcfcc7ca1ecc4',
    'default|AE @ 600': '77dca4598667c8cb',
    'default|FB 8 @ 600': 'ae4c2533138a4d16',
    'default|FB 32 @ 600': 'a1f4a90615c37e0c',
    'default|MDR 8 @ 600': 'defc6b481c3851a4',
    'default|MDR 32 @ 600': 'f90ccc89cedb6e6d',
    'default|FB 32 @ 3000': '5ea46231f2402a94',
    'default|MDR 32 @ 3000': '7c6344de32c662c3',
    'method_config|VAE': '9f3d9eff1181599d',
    'method_config|AE': '0bae0fe3f1f7522e',
    'method_config|CYC': 'ae16aa69f3c78a47',
    'method_config|FB': '0bddafeb0b6904c2',
    'method_config|MDR': '716bd26e56bd2a23',
    'method_config|CYC-FB': '833f5e67c3bc0dc6',
    'method_config|LM': 'b86b71d6adfe7476',
}
KEYS_FLOAT32_HEAD = {
    'smoke|VAE': 'b3477f0502f6a65e',
    'smoke|VAE, word dropout 0.4': '5dcb8646286b65ca',
    'smoke|VAE, word dropout 1': '4f319f8d0a67691f',
    'smoke|LM': 'e4068ad95a9bd966',
    'smoke|AE': '5824fdf75e7b1e2e',
    'smoke|CYC': 'ae71e4b0bd090b20',
    'smoke|FB 2': 'e813173c23073990',
    'smoke|FB 4': '675348192b6971d5',
    'smoke|MDR 2': '92d1e4f7da1bbf8f',
    'smoke|MDR 4': '7747a829803e0556',
    'smoke|CYC-FB 2': 'c23f23786db9e54f',
    'smoke|CYC-FB 4': '6beae0a502cf172b',
    'smoke|FB 4 (batch_dim)': '5b4f256e8adc4a74',
    'smoke|FB 4 (total)': 'ff699acf94699a46',
    'smoke|MDR 4 (undamped)': 'dc70d4235673d755',
    'smoke|MDR 4 (thesis)': 'fbebb1d9a267f955',
    'smoke|VAE @ 10': '4f5390ad32db0829',
    'smoke|AE @ 10': '6aa1574c8b8c8e7d',
    'smoke|FB 8 @ 10': '8d246c385f0b2f69',
    'smoke|FB 32 @ 10': 'b7af45171dcda6f9',
    'smoke|MDR 8 @ 10': '1244c5294ca12429',
    'smoke|MDR 32 @ 10': '5eee218faae1c539',
    'smoke|VAE @ 20': '745b6b9f591f8710',
    'smoke|AE @ 20': '37787dc4ec162158',
    'smoke|FB 8 @ 20': '9644177cbbc77210',
    'smoke|FB 32 @ 20': '942791ce29a4e560',
    'smoke|MDR 8 @ 20': '0541b083214ebd93',
    'smoke|MDR 32 @ 20': '594d878c93081357',
    'smoke|FB 32 @ 30': '9b18a6d491dbd35e',
    'smoke|MDR 32 @ 30': '29c835685d046967',
    'default|VAE': 'fb50f7c8161fad5a',
    'default|VAE, word dropout 0.4': '6eeea6dfe30c7ef0',
    'default|VAE, word dropout 1': 'cfe369c5c12d61c8',
    'default|LM': 'a9be942c5b34dbf5',
    'default|AE': '0d6729f2145ba929',
    'default|CYC': 'f10747c4aff9bf30',
    'default|FB 4': '77d8326d2a312b1e',
    'default|FB 8': '6f2a652a1d0719a1',
    'default|FB 16': 'd6bf7f859e8c38c0',
    'default|FB 24': '8a53fc50177ed6b0',
    'default|FB 32': '3d553ccc1b8b46e8',
    'default|MDR 4': 'eea049db325d9cad',
    'default|MDR 8': '01c44ac7389b32d1',
    'default|MDR 16': '97e400d29e1bf831',
    'default|MDR 24': '1f9d2c43a8dd496b',
    'default|MDR 32': 'd3861bcdce49f57d',
    'default|CYC-FB 4': '2158f187f71c522b',
    'default|CYC-FB 8': '4348da5b78f1ef0d',
    'default|CYC-FB 16': 'c5a73ccf5141740e',
    'default|CYC-FB 24': '57b7b118b2b8e983',
    'default|CYC-FB 32': '483c8f95145333c7',
    'default|FB 16 (batch_dim)': 'f0755cde4e1b77c6',
    'default|FB 16 (total)': 'e1d7229c8682facd',
    'default|MDR 16 (undamped)': '688c949d3edaec2a',
    'default|MDR 16 (thesis)': '29953d7ea65cc442',
    'default|VAE @ 600': '8bab50600a9a4fda',
    'default|AE @ 600': '59ca58f7bed00ca6',
    'default|FB 8 @ 600': '3d4e5c13658d2875',
    'default|FB 32 @ 600': 'beb0251a586d6632',
    'default|MDR 8 @ 600': '93d6238369d58815',
    'default|MDR 32 @ 600': '601f55b82fe5eaf5',
    'default|FB 32 @ 3000': '8a0f005aaaf4a34c',
    'default|MDR 32 @ 3000': '910b60d900bea510',
    'method_config|VAE': 'fb50f7c8161fad5a',
    'method_config|AE': '0d6729f2145ba929',
    'method_config|CYC': 'f10747c4aff9bf30',
    'method_config|FB': 'd6bf7f859e8c38c0',
    'method_config|MDR': '97e400d29e1bf831',
    'method_config|CYC-FB': 'c5a73ccf5141740e',
    'method_config|LM': 'a9be942c5b34dbf5',
}
PINNED_KEYS = {"bfloat16": KEYS_BFLOAT16_HEAD, "float32": KEYS_FLOAT32_HEAD}


@pytest.mark.parametrize("head", ["bfloat16", "float32"])
def test_every_run_of_the_book_keeps_its_key(monkeypatch, head):
    monkeypatch.setattr(config_module, "training_code_version", lambda native=False: "pinned")
    monkeypatch.setattr(profiles, "PROFILES", profiles.build_profiles(head))   # whatever this CPU has
    keys = {f"{profile}|{label}": cfg.key for profile in ("smoke", "default")
            for label, cfg in all_book_runs(profile).items()}
    for method in ("VAE", "AE", "CYC", "FB", "MDR", "CYC-FB", "LM"):
        target = 16.0 if get_method(method).takes_target else None
        keys[f"method_config|{method}"] = method_config(method, "default", target).key
    assert keys == PINNED_KEYS[head]


def test_every_config_name_is_an_entry_and_runs_carry_their_method():
    assert tuple(METHODS) == ("vae", "ae", "cyc", "fb", "mdr", "cyc_fb", "beta_vae", "lm")
    cfg = method_config("CYC-FB", "smoke", 4.0)
    assert method_of(cfg) is get_method("cyc_fb") and method_of(cfg.objective).label == "CYC-FB"
    with pytest.raises(ValueError, match=r"objective\.name='nope'.*'mdr'"):
        ObjectiveConfig(name="nope")


def _fixed_half_beta(distortion, kl_per_dim, config, beta, state, read):
    return elbo_loss(distortion, kl_per_dim, 0.5, read=read)


@pytest.fixture
def toy_method():
    method = register_method(Method("toy_half", "TOY", _fixed_half_beta, colour="#123456", marker="X"))
    yield method
    del METHODS[method.name]


def test_a_new_objective_is_one_entry(toy_method, tmp_path, monkeypatch):
    """Registered in one place, the toy objective passes config validation, trains through the run
    cache, has its colour in figures and is a choice of the command line."""
    from tvae_core import cli
    from tvae_core.runs import train_or_load

    monkeypatch.setattr("tvae_core.data.DEFAULT_CACHE_DIR", tmp_path / "data-cache")
    cfg = tiny_config(write_corpus(tmp_path / "corpus.txt"), "toy_half", max_steps=2)
    run = train_or_load(cfg, tmp_path / "runs", progress=False)
    assert len(run.history["train"]) == 2 and all(h["beta"] == 0.5 for h in run.history["train"])
    assert plotting.METHOD_COLOURS["TOY"] == "#123456" and plotting.method_colour("TOY") == "#123456"
    style = plotting.run_styles(["a toy run"], methods={"a toy run": run.config})["a toy run"]
    assert style["color"] == "#123456" and style["marker"] == "X" and style["method"] == "TOY"

    seen = {}
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.setdefault("cfg", cli._config_from_args(args)) and 0)
    assert cli.main(["train", "--objective", "toy_half", "--profile", "smoke"]) == 0
    assert seen["cfg"].objective.name == "toy_half" and seen["cfg"].label == "TOY"


def _multiplier_steps(objective, steps: int) -> float:
    """u after ``steps`` multiplier updates with the constraint violated throughout (R = 0 < r)."""
    method = get_method(objective.name)
    state = method.new_state(objective)
    optimizer = method.state_optimizer(state, objective)
    terms = {"distortion": torch.ones(4), "kl_per_dim": torch.zeros(4, 2)}
    for step in range(steps):
        loss, _ = compute_loss(terms, objective, step, steps, state)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return state.u.item()


def test_the_thesis_mdr_multiplier_moves_by_about_lr_per_step():
    cfg = thesis_mdr("smoke", 4.0)
    objective = cfg.objective
    assert cfg.label == "MDR 4 (thesis)" and objective.mdr_optimizer == "rmsprop" and objective.mdr_damping == 0
    assert get_method("mdr").new_state(objective).value.item() == pytest.approx(math.log(2.0))  # u0 = 0
    steps, lr = 400, objective.mdr_lr
    moved = _multiplier_steps(objective, steps)
    # RMSprop (alpha 0.99) with a near-constant gradient g: step t is lr g / sqrt((1 - 0.99^t) g^2)
    expected = lr * sum(1 / math.sqrt(1 - 0.99 ** t) for t in range(1, steps + 1))
    assert moved == pytest.approx(expected, rel=0.01)
    assert lr < moved / steps < 1.5 * lr
    # the book's MDR: SGD at mdr_lr, step lr sigmoid(u) (r - R): hundreds of times further here (~600)
    book = method_config("MDR", "smoke", 4.0).objective
    book_u0 = get_method("mdr").new_state(book).u.item()
    assert _multiplier_steps(book, steps) - book_u0 > 100 * moved
