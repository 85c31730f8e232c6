"""Bad parameters and inputs fail early, with a message that names the parameter and what it accepts."""
import pytest
import torch

from tvae_core.config import DataConfig, ModelConfig, ObjectiveConfig, TrainConfig
from tvae_core.data import CorpusError, read_text_file
from tvae_core.estimators import evaluate_log_likelihood, iw_log_likelihood
from tvae_core.experiments import method_config
from tvae_core.notebook import check_parameters
from tvae_core.objectives import free_bits_rate
from tvae_core.profiles import get_profile


def _non_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ok\n".encode("utf-8") + "na\u00efve".encode("latin-1"))
    return read_text_file(path)


def _empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    return read_text_file(path)


class _Model:
    latent_dim = 2


CASES = [
    ("unknown objective", lambda t: ObjectiveConfig(name="elbo++"), ValueError, r"objective\.name.*'vae'"),
    ("unknown free-bits variant", lambda t: ObjectiveConfig(name="fb", target_rate=4, free_bits_variant="dim"),
     ValueError, r"free_bits_variant.*example_dim"),
    ("free-bits variant at call time", lambda t: free_bits_rate(torch.zeros(2, 2), 1.0, "per_dim"), ValueError,
     "batch_dim"),
    ("unknown injection", lambda t: ModelConfig(injection="cross_attention"), ValueError, r"injection.*memory"),
    ("unknown pooling", lambda t: ModelConfig(pooling="last"), ValueError, r"pooling.*mean"),
    ("unknown profile", lambda t: get_profile("huge"), ValueError, r"profile.*smoke"),
    ("negative target rate", lambda t: ObjectiveConfig(name="mdr", target_rate=-1.0), ValueError, "target_rate"),
    ("non-finite target rate", lambda t: ObjectiveConfig(name="fb", target_rate=float("inf")), ValueError,
     "target_rate"),
    ("missing target rate", lambda t: ObjectiveConfig(name="mdr"), ValueError, "target_rate is required"),
    ("latent_dim < 1", lambda t: ModelConfig(latent_dim=0), ValueError, r"latent_dim.*>= 1"),
    ("heads do not divide hidden", lambda t: ModelConfig(hidden_size=30, num_heads=4), ValueError, "num_heads"),
    ("encoder depth 0", lambda t: ModelConfig(encoder_layers=0), ValueError, r"model\.encoder_layers"),
    ("encoder depth for a pretrained encoder", lambda t: ModelConfig(encoder="some/bert", encoder_layers=1),
     ValueError, r"model\.encoder_layers.*accepted value None"),
    ("word dropout outside [0,1]", lambda t: ModelConfig(word_dropout=1.5), ValueError, "word_dropout"),
    ("K < 1", lambda t: iw_log_likelihood(_Model(), {}, num_samples=0), ValueError, "num_samples"),
    ("K given as a bool", lambda t: evaluate_log_likelihood(_Model(), [], num_samples=True), (TypeError, ValueError),
     "num_samples"),
    ("empty corpus", _empty, CorpusError, "empty"),
    ("non-UTF-8 corpus", _non_utf8, CorpusError, "line 2"),
    ("text source without path", lambda t: DataConfig(source="text"), ValueError, r"data\.path"),
    ("unknown data source", lambda t: DataConfig(source="wikipedia"), ValueError, r"data\.source.*ptb"),
    ("non-positive learning rate", lambda t: TrainConfig(learning_rate=0.0), ValueError, "learning_rate"),
    ("batch size 0", lambda t: TrainConfig(batch_size=0), ValueError, "batch_size"),
    ("unknown LM-head dtype", lambda t: TrainConfig(lm_head_dtype="float16"), ValueError,
     r"train\.lm_head_dtype.*'bfloat16'"),
    ("unknown method", lambda t: method_config("VAE++", "smoke"), ValueError, r"method.*'MDR'"),
    ("targeted method without rate", lambda t: method_config("FB", "smoke"), ValueError, "target_rate"),
    ("papermill parameter of the wrong type",
     lambda t: check_parameters({"__annotations__": {"seed": int}, "seed": "0"}), TypeError, r"seed=.*expected"),
    ("papermill float where int expected",
     lambda t: check_parameters({"__annotations__": {"seed": int}, "seed": 1.5}), TypeError, "seed"),
    ("papermill unknown profile",
     lambda t: check_parameters({"__annotations__": {"profile": str}, "profile": "big"}), ValueError,
     r"profile.*smoke"),
]


@pytest.mark.parametrize("name,call,error,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_early_and_names_the_parameter(tmp_path, name, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


def test_cli_rejects_bad_parameters_with_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tvae_core", "train", "--objective", "mdr"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "target_rate" in result.stderr and "Traceback" not in result.stderr
