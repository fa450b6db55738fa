"""The request-parameter policy: one place that checks ``num_samples``, seeds and ``alpha`` and gives their
defaults, for ``predict``, the service and the CLI alike (each turns the ``ValueError`` into its own answer: a
400, or exit code 2)."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Literal, Sequence

if TYPE_CHECKING:
    from snodevit.inference.fitted import Calibration

MAX_SEED = 2**63 - 1  # seeds are in [0, MAX_SEED]: what a torch.Generator takes
AUTO = "auto"  # num_samples value that asks for adaptive sampling
#: S when a request or a command names none: the service's and `snodevit score`'s default, and the S the shipped
#: calibration was fitted with (`snodevit calibrate`), so the decision thresholds hold for default answers
DEFAULT_NUM_SAMPLES = 32
NumSamples = int | Literal["auto"]


def check_num_samples(num_samples: object) -> None:
    if num_samples == AUTO:
        return
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1 or 'auto', got {num_samples!r}")


def resolve_seeds(seed: int | Sequence[int] | None, batch_size: int) -> list[int]:
    """One seed per image: a given int is used for every image (same image + seed -> same answer); None draws."""
    if seed is None:
        return [secrets.randbelow(MAX_SEED) for _ in range(batch_size)]
    if isinstance(seed, int):
        seeds = [seed] * batch_size
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != batch_size:
            raise ValueError(f"got {len(seeds)} seeds for {batch_size} images")
    for s in seeds:
        if not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {s}")
    return seeds


def parse_num_samples(value: object) -> NumSamples:
    """``num_samples`` as people write it (a form field, a CLI flag): "auto" in any case with blanks around it, or
    an integer >= 1 (an int, or text holding one).

    Raises:
        ValueError: anything else, naming the parameter.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"num_samples must be an integer >= 1 or 'auto', got {value!r}") from None
    check_num_samples(value)
    return value  # type: ignore[return-value]


def check_seed(seed: int) -> int:
    """``seed`` if it is in [0, MAX_SEED]. Raises ValueError naming the parameter otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return seed


def check_alpha(alpha: float) -> float:
    """``alpha`` if it is a conformal miscoverage in (0, 1). Raises ValueError naming the parameter otherwise."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return alpha


def default_alpha(calibration: "Calibration") -> float | None:
    """The conformal miscoverage used when a request names none: the smallest fitted alpha (the largest, safest
    sets), or None when no conformal threshold was fitted."""
    return calibration.alphas[0] if calibration.alphas else None
