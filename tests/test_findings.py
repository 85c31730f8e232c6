"""The shared vocabulary of the pages' verdicts."""
import pytest

from tvae_core.findings import ON_TARGET_TOLERANCE, on_target, relative_deviation


def test_on_target_is_a_relative_band_around_the_target():
    assert ON_TARGET_TOLERANCE == 0.10
    assert on_target(8.79, 8.0) and on_target(7.21, 8.0)
    assert not on_target(8.9, 8.0) and not on_target(7.1, 8.0)
    assert relative_deviation(6.0, 8.0) == pytest.approx(-0.25)


@pytest.mark.parametrize("call, name", [(lambda: relative_deviation(1.0, 0.0), "target"),
                                        (lambda: on_target(1.0, 1.0, tolerance=-0.1), "tolerance")])
def test_bad_inputs_name_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()
