"""The N:M pattern and the group layout as values: parsed once, written as text (``"2:4"``, ``"row"``).

Plain Python (no torch): the config holds an :class:`NMPattern`, and the run-folder contract
(``bame.contract``) and ``analysis`` read patterns back from the text the config wrote. What a group
*is* (which weights form one) is stated once, in ``bame.nm``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = ["Layout", "NMPattern"]


class Layout(str, Enum):
    """Which consecutive weights form a group of M."""

    ROW = "row"  # M consecutive entries of weight.reshape(Cout, -1)
    CHANNEL = "channel"  # M consecutive input channels at one kernel position (conv only)

    @classmethod
    def parse(cls, value: Layout | str) -> Layout:
        if isinstance(value, Layout):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown N:M layout {value!r}: use one of {[v.value for v in cls]}"
            ) from None


_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True, eq=False)
class NMPattern:
    """At most ``n`` non-zeros in every group of ``m`` consecutive weights. ``n == m`` is dense.

    Its text is ``"n:m"`` (``str``), and it compares equal to that text too: ``cfg.method.pattern ==
    "1:16"`` holds for the config's parsed pattern as it did for the string the config once held.
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not (1 <= self.n <= self.m):
            raise ValueError(
                f"invalid N:M pattern {self.n}:{self.m}: need integers with 1 <= N <= M, e.g. '2:4' or '1:16'"
            )

    @classmethod
    def parse(cls, value: NMPattern | str | tuple[int, int]) -> NMPattern:
        """Parse ``"2:4"``, ``(2, 4)`` or an ``NMPattern``; raises ``ValueError`` naming the pattern."""
        if isinstance(value, NMPattern):
            return value
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(int(value[0]), int(value[1]))
        match = _PATTERN_RE.match(str(value))
        if match is None:
            raise ValueError(
                f"invalid N:M pattern {value!r}: write it as 'N:M' with integers 1 <= N <= M, e.g. '2:4'"
            )
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def is_dense(self) -> bool:
        return self.n == self.m

    @property
    def slug(self) -> str:
        """``"2of4"``: the pattern as it stands in a run id or a file name (no colon)."""
        return f"{self.n}of{self.m}"

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NMPattern):
            return (self.n, self.m) == (other.n, other.m)
        if isinstance(other, str):
            return other == str(self)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))  # equal to its text, so hashed as its text
