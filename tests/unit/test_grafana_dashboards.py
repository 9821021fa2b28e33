"""The committed dashboards are exactly what monitoring/grafana_dashboards.py builds, and they are built for
1,000 substations: no panel draws one series per substation, every per-substation selector follows the
``$substation`` variable (the one place a ``region`` matcher will be added)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from monitoring.grafana_dashboards import DASHBOARDS, OUT_DIR, PROBLEM_LISTS, SUBSTATION_MATCHER, main, render

PER_SUBSTATION = re.compile(r"\b(gridlb_substation_\w+|gridlb_agent_\w+|gridlb_stale_telemetry_total)\b")
#: Aggregations that turn N substations into a bounded number of series.
BOUNDED = re.compile(r"^\s*(sum|count|min|max|avg|stddev|quantile|topk|bottomk)\b"
                     r"|\band on \(substation\) (topk|bottomk)\(\$topk")


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in doc["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


@pytest.mark.parametrize("name", list(DASHBOARDS))
def test_committed_json_is_what_the_generator_builds(name: str) -> None:
    assert (OUT_DIR / name).read_text(encoding="utf-8") == render(name), \
        f"{name} differs: run python -m monitoring.grafana_dashboards"


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path)]) == 0  # writes
    assert main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "balancer.json").write_text("{}")
    assert main(["--check", "--out", str(tmp_path)]) == 1


def test_every_dashboard_is_the_provisioned_one() -> None:
    assert sorted(p.name for p in OUT_DIR.glob("*.json")) == sorted(DASHBOARDS)


@pytest.mark.parametrize("name", list(DASHBOARDS))
def test_no_panel_draws_a_series_per_substation(name: str) -> None:
    """At 1,000 substations a panel with one line per substation is unreadable and expensive: per-substation
    metrics are aggregated over substations or cut to the ``$topk`` worst; only the lists of problems (offline,
    stale, draining) show every substation that has the problem."""
    doc = json.loads(render(name))
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids))
    for panel in panels(doc):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr is None or not PER_SUBSTATION.search(expr) or panel["title"] in PROBLEM_LISTS:
                continue
            assert BOUNDED.search(expr), f"{name}: {panel['title']}: unbounded per-substation query {expr!r}"
            if re.match(r"\s*(topk|bottomk)\(", expr):  # a range query picks its k per step: more than k lines
                assert target.get("instant") and not target.get("range"), f"{name}: {panel['title']}: {expr!r}"
            for selector in re.findall(r"(?:gridlb_substation_\w+|gridlb_agent_\w+|gridlb_stale_telemetry_total)"
                                       r"(\{[^}]*\})?", expr):
                assert SUBSTATION_MATCHER in selector, f"{name}: {panel['title']}: {expr!r} ignores $substation"


def test_per_substation_dashboards_have_substation_and_topk_variables() -> None:
    for name in ("grid-overview.json", "ev-sessions.json"):
        names = [v["name"] for v in json.loads(render(name))["templating"]["list"]]
        assert {"substation", "topk"} <= set(names), name
