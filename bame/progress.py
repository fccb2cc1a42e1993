"""A sweep's overall progress: runs done and left, and an ETA from the wall times of the runs finished."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SweepProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class SweepProgress:
    """Counts the runs a sweep trains (skipped ones are not its work) and estimates the time left as
    (mean wall time of the finished runs) x (runs left) / (runs at a time)."""

    to_run: int
    jobs: int = 1
    wall_times: list[float] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.wall_times)

    @property
    def left(self) -> int:
        return self.to_run - self.done

    def finished(self, wall_time_s: float) -> str:
        """Record one finished run (completed, failed or diverged); returns the progress line."""
        self.wall_times.append(float(wall_time_s))
        return self.line()

    def eta_s(self) -> float | None:
        if not self.wall_times:
            return None
        mean = sum(self.wall_times) / len(self.wall_times)
        return mean * self.left / max(1, min(self.jobs, self.left or 1))

    def line(self) -> str:
        text = f"sweep progress: {self.done}/{self.to_run} runs done, {self.left} left"
        eta = self.eta_s()
        if eta is not None and self.left:
            mean = sum(self.wall_times) / len(self.wall_times)
            text += f", about {format_duration(eta)} to go ({format_duration(mean)} per run)"
        return text
