"""The numeric core: Gaussians per level, nearest-neighbour banks, anomaly maps, thresholds with their laws, fused
p-values and drift tests. Plain numpy/scipy on feature vectors; it knows nothing of images, networks or files.

The choices it implements are declared here, where the code that implements them lives, and the parameter table
(:mod:`gaussad.detector.params`) offers them; this package imports nothing, so the table stays light to import.
"""

ESTIMATORS = ("ledoit-wolf", "oas", "empirical", "diagonal", "l2")
REDUCTIONS = (None, "pca", "npca")
THRESHOLDS = ("chi2", "hotelling", "conformal")
