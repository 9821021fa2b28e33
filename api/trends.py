"""The live page's trends: the last 15 minutes of each substation's load, EV load and limit, sampled as telemetry
arrives (pure: time is passed in).

One point per substation per ``step_s`` at most, ``window_s / step_s`` points kept (90 at the defaults: about
9 KB per substation), so the cost does not grow with how often agents report. An API that starts has no history:
its trends fill from then on (the recorder keeps the long history in the time-series database).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

#: Seconds between points and seconds of history.
TREND_STEP_S = 10.0
TREND_WINDOW_S = 900.0


@dataclass(slots=True)
class _Series:
    points: deque[tuple[float, float | None, float | None, float | None]] = field(default_factory=deque)


class Trends:
    def __init__(self, step_s: float = TREND_STEP_S, window_s: float = TREND_WINDOW_S) -> None:
        self.step_s = step_s
        self.window_s = window_s
        self._series: dict[str, _Series] = {}

    def sample(self, sid: str, now: float, load_kw: float | None, ev_load_kw: float | None,
               limit_kw: float | None) -> bool:
        """Record a point unless the last one is younger than ``step_s``; True when one was recorded."""
        series = self._series.get(sid)
        if series is None:
            series = self._series[sid] = _Series()
        points = series.points
        if points and now - points[-1][0] < self.step_s:
            return False
        points.append((now, load_kw, ev_load_kw, limit_kw))
        while points and now - points[0][0] > self.window_s:
            points.popleft()
        return True

    def forget(self, sid: str) -> None:
        self._series.pop(sid, None)

    def view(self, now: float, substation_ids: list[str] | None = None) -> dict[str, Any]:
        """Per substation: ``t`` (epoch seconds) and the three series, oldest first, within the window."""
        out: dict[str, Any] = {}
        for sid in sorted(self._series if substation_ids is None else set(substation_ids) & set(self._series)):
            points = [p for p in self._series[sid].points if now - p[0] <= self.window_s]
            out[sid] = {"t": [round(p[0], 3) for p in points], "load_kw": [p[1] for p in points],
                        "ev_load_kw": [p[2] for p in points], "limit_kw": [p[3] for p in points]}
        return {"step_s": self.step_s, "window_s": self.window_s, "substations": out}
