"""Training dynamics: when does training become stable? `butterfly` (twins, perturbations, barriers
between them) and `converge` (seed convergence over checkpoint series), sharing `probes`."""
