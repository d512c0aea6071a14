"""Counter-based random numbers: every draw is a pure function of (seed, epoch, sample, stream, k).

The augmentations draw their parameters here instead of from a stateful generator, so a sample's
crop, flip and colour jitter in an epoch depend only on the run's seed, the epoch, the sample's
index in the dataset and which view (stream) it is for: not on thread scheduling, batch
composition, the number of workers or where an interrupted run resumed.

The generator is SplitMix64's finaliser applied to a key folded from the five counters (Steele et
al. 2014); its 53 high bits give a uniform float in [0, 1). Computed with numpy's uint64
arithmetic, which wraps around as the algorithm needs.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of uint64 with good avalanche)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, index: np.ndarray, stream: int, n: int) -> np.ndarray:
    """float64 [len(index), n] in [0, 1): draw k of sample index[b] in (seed, epoch, stream)."""
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed) ^ _mix(np.uint64(epoch) ^ _mix(np.uint64(stream))))
        z = _mix(key ^ _mix(np.asarray(index, dtype=np.uint64)))[:, None]
        z = _mix(z ^ _mix(np.arange(n, dtype=np.uint64))[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
