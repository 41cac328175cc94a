"""The cost model: MACs and parameters per block and per choice of the search space."""
