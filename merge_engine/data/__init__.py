"""Data for the merges that need it: calibration blocks resolved to pinned data and batches
(``calibration``), and what a model computes on them, Gram matrices and Fisher diagonals
(``stats``). Used by the planner (which data each model gets), by alignment on activations,
by the statistics pass before a merge and by the kernels that merge with data."""
