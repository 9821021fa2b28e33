"""docs/recorder.md agrees with the code: the schema table, Flux queries, metric names and settings."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from grid_protocol.topics import CHANNELS
from monitoring.recorder.metrics import RecorderCollector, RecorderStats, latency_histogram
from monitoring.recorder.schema import SCHEMA
from monitoring.recorder.settings import InfluxSettings, RecorderSettings

DOC = (Path(__file__).resolve().parents[2] / "docs" / "recorder.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = DOC.index(f"\n## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end != -1 else None]


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_schema_table_matches_schema_py() -> None:
    rows = [line for line in _section("Schema").splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        name, source, tags, fields = (c.strip() for c in row.strip("|").split("|"))
        [measurement] = _names(name)
        documented[measurement] = (
            _names(source)[0], tuple(_names(tags)),
            {f: t for f, t in re.findall(r"`(\w+)` \((\w+)\)", fields)})
    expected = {m.name: (CHANNELS[m.source].template, m.tags, {f: str(t) for f, t in m.fields.items()})
                for m in SCHEMA.values()}
    assert documented == expected


def test_flux_queries_use_only_schema_names() -> None:
    queries = re.findall(r"```flux\n(.*?)```", DOC, re.S)
    assert len(queries) >= 4
    all_tags = {t for m in SCHEMA.values() for t in m.tags} | {"_measurement", "_field", "_value", "_time"}
    for q in queries:
        measurements = re.findall(r'_measurement == "(\w+)"', q)
        assert measurements and set(measurements) <= set(SCHEMA), q
        fields = set(re.findall(r'_field == "(\w+)"', q))
        assert fields <= {f for m in measurements for f in SCHEMA[m].fields}, q
        # After a pivot on _field the fields are columns too (one EV's answers: ev_id is a field, not a tag).
        pivoted = {f for m in measurements for f in SCHEMA[m].fields} if "pivot(" in q else set()
        for tag in re.findall(r"\br\.(\w+)", q):
            assert tag in all_tags | pivoted, (tag, q)
            if not tag.startswith("_"):
                assert any(tag in SCHEMA[m].tags for m in measurements) or tag in pivoted, (tag, q)
        for col in re.findall(r'columns: \[([^\]]*)\]', q):
            assert set(re.findall(r'"(\w+)"', col)) <= all_tags, q
    for metric in re.findall(r"`[a-z_]+\((\w+)", _section("Example Flux queries")):  # MetricsQL examples
        measurement = next(m for m in SCHEMA if metric.startswith(m + "_"))
        assert metric[len(measurement) + 1:] in SCHEMA[measurement].fields


def test_metrics_table_matches_what_the_recorder_exports() -> None:
    registry = CollectorRegistry()
    registry.register(RecorderCollector(RecorderStats(), lambda: 0))
    latency_histogram(registry)
    exported = {(n.removesuffix("_total"), t) for n, t in
                re.findall(r"^# TYPE (gridlb_recorder_\w+) (\w+)", generate_latest(registry).decode(), re.M)
                if not n.endswith("_created")}
    rows = [line for line in _section("Metrics").splitlines() if line.startswith("| `gridlb_recorder")]
    documented = {(_names(r)[0].removesuffix("_total"), r.split("|")[2].strip()) for r in rows}
    assert documented == exported


def test_every_setting_is_documented() -> None:
    table = _section("Configuration")
    for name in RecorderSettings.model_fields:
        if name not in ("influx", "mqtt", "grid"):
            assert f"`RECORDER_{name.upper()}`" in table, name
    for name in InfluxSettings.model_fields:
        assert f"`INFLUX_{name.upper()}`" in table, name
