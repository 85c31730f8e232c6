"""Two CPU processes (gloo, launched by torchrun; Accelerate picks up the process group) give the metrics of one process with the same
global batch, and the MDR multiplier is identical on both ranks at every step."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_config, write_corpus

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _train(config, runs_dir, processes):
    path = runs_dir / "config.json"
    runs_dir.mkdir(parents=True)
    path.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TVAE_DATA_CACHE": str(runs_dir / "data-cache")}
    train = ["-m", "tvae_core", "train", "--config", str(path), "--runs-dir", str(runs_dir), "--quiet"]
    if processes == 1:
        cmd = [sys.executable, *train]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        cmd = [torchrun, "--nproc_per_node", str(processes), "--master_port", "29517", *train]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = runs_dir / config.key
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["num_processes"] == processes
    return (json.loads((run_dir / "history.json").read_text()), json.loads((run_dir / "metrics.json").read_text()))


def test_two_processes_match_one_process_and_keep_the_multiplier_in_sync(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", num_sentences=148)  # 128 training sentences: equal slices
    config = tiny_config(corpus, "mdr", 3.0, max_steps=6)
    # no randomness in the forward pass (dropout off, z = posterior mean), so the only difference
    # between the runs is how the global batch is split across processes
    config = config.replace(model={"dropout": 0.0, "deterministic_encoder": True})
    single_history, single = _train(config, tmp_path / "one", 1)
    double_history, double = _train(config, tmp_path / "two", 2)
    for key in ("rate", "distortion", "elbo", "mdr_lambda"):
        assert double[key] == pytest.approx(single[key], rel=1e-4, abs=1e-4), key
    for one, two in zip(single_history["train"], double_history["train"]):
        assert two["mdr_lambda_rank_spread"] == 0.0
        assert two["mdr_lambda"] == pytest.approx(one["mdr_lambda"], rel=1e-5)
        assert two["rate"] == pytest.approx(one["rate"], rel=1e-4, abs=1e-5)
        assert two["distortion"] == pytest.approx(one["distortion"], rel=1e-4)
