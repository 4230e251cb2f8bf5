r"""Mahalanobis OOD scoring on a flow's conditioner features: streaming fit, per-position maps, image aggregates.

Score convention: the per-position OOD score is the Mahalanobis distance (not squared) of the conditioner feature
vector g(y) at that position from a Gaussian fitted on in-distribution images; higher = more out of distribution.

Typical use::

    import robustness_diag as rd
    flow = rd.load_flow("bundled:sr4x_affine")
    scorer = rd.ood.fit_flow(flow, lr_images, rd.ood.FeatureOptions(levels=["fea_up1"]), shrinkage="oas")
    scorer.save("stats.safetensors")
    maps = rd.ood.score_maps(flow, scorer, lr)          # {"fea_up1": [h, w]}, every position
    rd.ood.aggregate(maps["fea_up1"], scorer.threshold())   # mean, p95, p99, max, frac_above (border margin left out)

``fit_flow`` holds every 5th image out of the Gaussian (``calibration_fraction=0.2``) and calibrates
``scorer.threshold()`` on their interior distances (the empirical 0.99 quantile); tiling is exact by default
(margin = the receptive field, :mod:`.features`).
"""
from .errors import NonFiniteStatisticsError, NotFittedError, OODError, StatsFileError, StatsMismatchError
from .gaussian import (SHRINKAGE_METHODS, GaussianAccumulator, ledoit_wolf_shrinkage, oas_shrinkage,
                       shrunk_covariance, whitening_factor)
from .scorer import (FORMAT, FORMAT_VERSION, LevelStats, MahalanobisScorer, chi_quantile, mahalanobis_distance,
                     mahalanobis_distance_cf, triangular_blocks)
from .borders import DEFAULT_BORDER_MARGIN, border_distance, interior_mask
from .features import (AGGREGATES, DEFAULT_CALIBRATION_FRACTION, DEFAULT_LEVEL, FeatureExtractor, FeatureOptions,
                       ThresholdCalibrator, accumulate, aggregate, available_levels, conditioner_features,
                       default_level, extractor_for, feature_channels, feature_levels, fit_flow, fit_statistics,
                       held_out, level_ratio, lr_alignment, make_accumulators, mark_uncalibrated,
                       nonfinite_score_reason, parse_channels, receptive_field, resolve_levels, score_maps,
                       upsample_map)

__all__ = [
    "OODError", "NotFittedError", "NonFiniteStatisticsError", "StatsFileError", "StatsMismatchError",
    "SHRINKAGE_METHODS", "GaussianAccumulator", "oas_shrinkage", "ledoit_wolf_shrinkage", "shrunk_covariance",
    "whitening_factor", "FORMAT", "FORMAT_VERSION", "LevelStats", "MahalanobisScorer", "chi_quantile",
    "mahalanobis_distance", "mahalanobis_distance_cf", "triangular_blocks", "DEFAULT_BORDER_MARGIN",
    "border_distance", "interior_mask", "AGGREGATES", "DEFAULT_CALIBRATION_FRACTION", "DEFAULT_LEVEL",
    "ThresholdCalibrator", "held_out", "mark_uncalibrated",
    "FeatureExtractor", "FeatureOptions", "accumulate", "aggregate", "available_levels", "conditioner_features",
    "default_level", "extractor_for", "feature_channels", "feature_levels", "fit_flow", "fit_statistics",
    "level_ratio", "lr_alignment", "make_accumulators", "nonfinite_score_reason", "parse_channels",
    "receptive_field", "resolve_levels", "score_maps", "upsample_map",
]
