"""softtargets: train classifiers on soft targets and distil knowledge from teachers."""

__version__ = "0.1.0"
