"""Low-discrepancy draws for training: where a prompt's random views and timesteps can come from.

DreamFusion draws every step's camera and timestep independently. Over a few hundred steps the
independent draws leave gaps and clusters (a stretch of low views, a run of small timesteps), and
every prompt trained with one seed meets the same ones, so one seed can fail a shape that the next
gets right. A low-discrepancy sequence keeps the same distribution but covers it evenly over every
stretch of steps.

The sequence is Roberts' R_d: point n is ``frac(offset + n * alpha)`` with ``alpha_i = g**-i``
(i = 1..d) and g the real root of ``g**(d + 1) = g + 1`` (d = 1: the golden ratio). Its three
coordinates here are (azimuth share, elevation share, timestep share), each in [0, 1), mapped onto
their ranges by the caller (`cameras.sample_random_cameras`, `SDSGuidance.sample_t`). The offset
comes from the prompt's seed through its own generator, so nearby seeds give unrelated sequences
and the seed's other draws stay as they were.
"""

from __future__ import annotations

import functools
import math

import torch

DIMS = 3  # (azimuth, elevation, timestep)
_OFFSET_SALT = 0x5E0_0E5C  # keeps the offset's generator apart from the slot generators seeded with the seed itself


def roberts_alpha(dims: int) -> tuple[float, ...]:
    """R_d's increments ``g**-1 .. g**-dims``, with g the real root of ``g**(dims + 1) = g + 1``."""
    if dims < 1:
        raise ValueError(f"a low-discrepancy sequence needs at least one dimension, got {dims!r}")
    g = 2.0
    for _ in range(60):  # Newton on g**(d+1) - g - 1 from above: monotone, converges to double precision
        g -= (g ** (dims + 1) - g - 1.0) / ((dims + 1) * g**dims - 1.0)
    return tuple(g**-i for i in range(1, dims + 1))


_ALPHA = roberts_alpha(DIMS)


@functools.lru_cache(maxsize=4096)  # asked for every step of every prompt that uses the sequence
def sequence_offset(seed: int) -> tuple[float, ...]:
    """The sequence's start for a prompt's `seed`: DIMS uniforms from a generator of its own."""
    gen = torch.Generator().manual_seed((int(seed) ^ _OFFSET_SALT) & 0x7FFF_FFFF_FFFF_FFFF)
    return tuple(torch.rand(DIMS, generator=gen, dtype=torch.float64).tolist())


def sequence_point(index: int, offset: tuple[float, ...]) -> tuple[float, ...]:
    """Point `index` (>= 0) of the sequence that starts at `offset`: DIMS shares in [0, 1)."""
    if index < 0:
        raise ValueError(f"sequence index must be >= 0, got {index!r}")
    if len(offset) != DIMS:
        raise ValueError(f"expected a {DIMS}-dimensional offset, got {offset!r}")
    # index * alpha reduced first, so a long run keeps its precision (index < 2**53 in any case)
    return tuple(math.fmod(o + math.fmod(index * a, 1.0), 1.0) for o, a in zip(offset, _ALPHA))
