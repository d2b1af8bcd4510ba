"""The spectral analyses by their former module name: SLQ densities (:mod:`landscape.slq`) and
trace estimates (:mod:`landscape.traces`)."""

from landscape.slq import (DEFAULT_GRID_POINTS, DEFAULT_VARIANCE, SpectralDensity,
                           gaussian_density, slq)
from landscape.traces import TraceEstimate, hutchinson_trace, hutchpp_trace, rademacher_probes

__all__ = ["SpectralDensity", "slq", "gaussian_density", "rademacher_probes", "TraceEstimate",
           "hutchinson_trace", "hutchpp_trace", "DEFAULT_VARIANCE", "DEFAULT_GRID_POINTS"]
