"""The one plotting package of the book: one style, one colour per method and term.

Notebooks call :func:`set_style` once and draw every figure through the functions here, so the
same method has the same colour on every page. Modules by topic: :mod:`.style` (sizes, palettes),
:mod:`.bounds` (the MI-bound decomposition, estimators vs exact answers), :mod:`.training`
(curves and the rate-distortion plane of trained runs), :mod:`.latent` (latent histograms,
mixed-membership heatmaps). Every figure function takes an ``ax`` (made with
:func:`new_figure` when None) and returns it.
"""
from .bounds import plot_bound_decomposition, plot_estimator_comparison, plot_estimator_convergence
from .training import (plot_achieved_vs_target, plot_elbo_vs_rate, plot_kl_per_dimension, plot_multiplier_trajectories, plot_rate_against_target, plot_rate_distortion_plane, plot_run_dots, plot_training_curves, run_styles, shades, smooth)  # noqa: E501
from .latent import (plot_elbo_landscape, plot_kl_decomposition_by_run, plot_latent_histogram, plot_latent_histograms, plot_mi_bounds_by_run, plot_mixing_weights, plot_terms_along_path, plot_versus_rate)  # noqa: E501
from .style import (
    COLUMN_WIDTH,
    ESTIMATOR_COLOURS,
    FIGURE_SIZES,
    METHOD_COLOURS,
    METHOD_MARKERS,
    OKABE_ITO,
    TERM_COLOURS,
    TERM_LABELS,
    finish_axes,
    method_colour,
    new_figure,
    set_style,
    symlog_axis,
)
