"""Instrumented sampling: exploding-inverse traces, artifact masks and explosion maps, and a safe-sampling guard.

``rd.detect.trace_sampling(flow, lr, heat, n_samples, generator)`` -> :class:`TraceResult` (per-layer, per-position
inverse statistics, attribution and explosion maps, artifact masks); ``rd.detect.safe_sample(...)`` ->
:class:`SafeSampleResult` (samples whose artifact pixels are repaired at lower heat, with what was repaired).
"""
from .records import LayerRecord, StageRecord, TraceResult
from .trace import (GROWTH_FLOOR, GROWTH_THRESHOLD, LOWER, UPPER, artifact_masks, draw_sample_latents, layer_names,
                    trace_sampling)
from .safe import SafeSampleResult, safe_sample

__all__ = ["trace_sampling", "safe_sample", "TraceResult", "SafeSampleResult", "LayerRecord", "StageRecord",
           "artifact_masks", "layer_names", "draw_sample_latents", "UPPER", "LOWER", "GROWTH_THRESHOLD",
           "GROWTH_FLOOR"]
