"""Second-moment statistics of MLP keys (C0 = E[k kᵀ]) for the locate-and-edit methods."""
from lmpatch.stats.corpus import DEFAULT_CORPUS, Corpus, open_corpus
from lmpatch.stats.covariance import (
    SecondMoment,
    StatsConfig,
    cached_stats,
    inverse_second_moment,
    second_moment,
    second_moments,
    stats_path,
)

__all__ = [
    "DEFAULT_CORPUS",
    "Corpus",
    "SecondMoment",
    "StatsConfig",
    "cached_stats",
    "inverse_second_moment",
    "open_corpus",
    "second_moment",
    "second_moments",
    "stats_path",
]
