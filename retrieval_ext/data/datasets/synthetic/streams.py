"""The random streams of the synthetic data: one ``numpy.random.Generator`` per purpose and index.

Each part of the data draws from its own stream, keyed by (seed, purpose, index...), so changing
one count (e.g. ``num_db``) does not change the instances, and the generic detection set never
shares a stream with the benchmark.
"""

import numpy as np

__all__ = ["PLAN", "INSTANCE", "DISTRACTOR", "DB", "QUERY", "GENERIC", "rng"]

PLAN = 0  # which instances each database image holds
INSTANCE = 1  # the design of instance k: (seed, INSTANCE, k)
DISTRACTOR = 2  # the design of distractor j: (seed, DISTRACTOR, j)
DB = 3  # database image i: (seed, DB, i)
QUERY = 4  # query view q of instance k: (seed, QUERY, k, q)
GENERIC = 100  # generic detection image i: (seed, GENERIC, i)


def rng(*key: int) -> np.random.Generator:
    """The random stream of ``key`` (seed, purpose, indices...), the same for the same key."""
    return np.random.default_rng([int(k) for k in key])
