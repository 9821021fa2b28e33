"""The Grafana dashboards as code: Grafana's typed SDK (``grafana-foundation-sdk``) builds them, the JSON in
``monitoring/grafana/dashboards/`` is generated from here and committed (Grafana provisions files), and
``tests/unit/test_grafana_dashboards.py`` fails when the two differ.

    python -m monitoring.grafana_dashboards            # rewrite the JSON files
    python -m monitoring.grafana_dashboards --check    # exit 1 if a file is not what this module builds

Built for 1,000 substations: no panel draws one series per substation. Per-substation panels show the
``$topk`` worst (``topk`` over the whole time range, so the set of series is stable while zooming), the rest of
the grid is shown as counts, totals and quantiles across substations, and the ``$substation`` variable narrows
everything to the substations picked. Every per-substation selector is written by :func:`sub` and every
per-substation variable query by :data:`SUBSTATION_VALUES`: when issue 12 adds a ``region`` label, a
``region`` variable goes next to ``$substation`` and these two places add ``region=~"$region"``; grid totals
then group ``by (region)`` (docs/observability.md, "Dashboards at 1,000 substations").

The SDK pin (``grafana-foundation-sdk==1769699630!11.2.0``, the Grafana 11.2 line that docker compose runs)
matters: other lines emit other defaults, so the committed JSON is only reproducible with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

OUT_DIR = Path(__file__).resolve().parent / "grafana" / "dashboards"
PROM = dm.DataSourceRef(type_val="prometheus", uid="prometheus")
INFLUX = dm.DataSourceRef(type_val="influxdb", uid="influxdb")
#: Matcher of every per-substation selector (the region hook: add ``region=~"$region"`` here).
SUBSTATION_MATCHER = 'substation=~"$substation"'
#: The ``$substation`` variable's values (the region hook: ``{region=~"$region"}`` on this metric).
SUBSTATION_VALUES = "label_values(gridlb_substation_capacity_watts, substation)"


def sub(metric: str, extra: str = "") -> str:
    """``metric{substation=~"$substation"[, extra]}``: every per-substation series of the dashboards."""
    return f"{metric}{{{SUBSTATION_MATCHER}{', ' + extra if extra else ''}}}"


def worst(expr: str, by: str, *, smallest: bool = False) -> str:
    """``expr`` for the ``$topk`` substations with the highest (lowest) ``by`` over the whole time range: one
    ``topk`` evaluated at the range's end (``@ end()``), so zooming does not swap series in and out."""
    pick = "bottomk" if smallest else "topk"
    over = "min_over_time" if smallest else "max_over_time"
    return f"{expr} and on (substation) {pick}($topk, {over}({by}[$__range] @ end()))"


# --- queries -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flux(cogvariants.Dataquery):
    """A Flux query for the InfluxDB datasource (the SDK ships no InfluxDB query type)."""

    ref_id: str
    query: str

    def to_json(self) -> dict[str, Any]:
        return {"datasource": {"type": "influxdb", "uid": "influxdb"}, "query": self.query, "refId": self.ref_id}


class FluxQuery(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, ref_id: str, query: str) -> None:
        self._query = Flux(ref_id, query)

    def build(self) -> cogvariants.Dataquery:
        return self._query


def prom(ref: str, expr: str, legend: str = "__auto", *, instant: bool = False,
         table: bool = False) -> prometheus.Dataquery:
    """A PromQL target: a range query (time series), or ``instant`` (the value now: rankings, tables)."""
    q = prometheus.Dataquery().ref_id(ref).expr(expr).legend_format(legend).datasource(PROM)
    if table:
        return q.instant().format(pm.PromQueryFormat.TABLE)
    return q.instant() if instant else q.range()


def flux(ref: str, *lines: str) -> FluxQuery:
    return FluxQuery(ref, "\n  |> ".join(("from(bucket: v.defaultBucket)",
                                           "range(start: v.timeRangeStart, stop: v.timeRangeStop)", *lines)))


# --- panels --------------------------------------------------------------------------------------------------
Target = cogbuilder.Builder[cogvariants.Dataquery]


def graph(title: str, description: str, unit: str, targets: Sequence[Target], *, w: int = 12, h: int = 8,
          ds: dm.DataSourceRef = PROM, legend_table: bool = False) -> timeseries.Panel:
    legend = common.VizLegendOptions().show_legend(True).placement(cm.LegendPlacement.BOTTOM)
    legend = legend.display_mode(cm.LegendDisplayMode.TABLE if legend_table else cm.LegendDisplayMode.LIST)
    if legend_table:
        legend = legend.calcs(["lastNotNull", "max"])
    return (timeseries.Panel().title(title).description(description).datasource(ds).unit(unit).span(w).height(h)
            .line_width(1).fill_opacity(0).show_points(cm.VisibilityMode.NEVER).legend(legend)
            .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
            .targets(list(targets)))


def stats(title: str, description: str, unit: str, targets: Sequence[Target], *, w: int = 6, h: int = 5,
          ds: dm.DataSourceRef = PROM) -> stat.Panel:
    return (stat.Panel().title(title).description(description).datasource(ds).unit(unit).span(w).height(h)
            .graph_mode(cm.BigValueGraphMode.NONE).color_mode(cm.BigValueColorMode.VALUE)
            .text_mode(cm.BigValueTextMode.VALUE_AND_NAME)
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .targets(list(targets)))


def ranking(title: str, description: str, unit: str, targets: Sequence[Target], *, w: int = 8, h: int = 8,
            ds: dm.DataSourceRef = PROM) -> bargauge.Panel:
    """A sorted bar per substation (or reason, status): for top-k lists read at a glance. PromQL targets are
    instant queries: a range query would pick its top k per step and show more than k bars."""
    return (bargauge.Panel().title(title).description(description).datasource(ds).unit(unit).span(w).height(h)
            .orientation(cm.VizOrientation.HORIZONTAL).display_mode(cm.BarGaugeDisplayMode.BASIC)
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .targets(list(targets)))


def listing(title: str, description: str, targets: Sequence[Target], *, w: int = 8, h: int = 8,
            sort_by: str = "Value", desc: bool = True) -> table.Panel:
    sort = common.TableSortByFieldState().display_name(sort_by).desc(desc)
    return (table.Panel().title(title).description(description).datasource(PROM).span(w).height(h)
            .sort_by([sort]).targets(list(targets))
            .with_transformation(dm.DataTransformerConfig(id_val="organize", options={
                "excludeByName": {"Time": True, "__name__": True, "job": True, "instance": True}})))


# --- variables and the dashboard frame -----------------------------------------------------------------------
def substation_variable() -> dashboard.QueryVariable:
    return (dashboard.QueryVariable("substation").label("Substation").datasource(PROM)
            .query(SUBSTATION_VALUES).multi(True).include_all(True).all_value(".*")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
            .current(dm.VariableOption(selected=True, text="All", value="$__all")))


def topk_variable() -> dashboard.CustomVariable:
    return (dashboard.CustomVariable("topk").label("Show the worst").values("5,10,20,50")
            .current(dm.VariableOption(selected=True, text="10", value="10")))


def frame(uid: str, title: str, description: str, variables: Iterable[Any] = ()) -> dashboard.Dashboard:
    d = (dashboard.Dashboard(title).uid(uid).description(description).tags(["gridlb"]).editable()
         .tooltip(dm.DashboardCursorSync.CROSSHAIR).refresh("10s").time("now-30m", "now").timezone("browser")
         .timepicker(dashboard.TimePicker().refresh_intervals(["5s", "10s", "30s", "1m", "5m"]))
         .link(dashboard.DashboardLink("Grid dashboards").type(dm.DashboardLinkType.DASHBOARDS).tags(["gridlb"])
               .as_dropdown(True).include_vars(False).keep_time(True)))
    for v in variables:
        d = d.with_variable(v)
    return d


UTIL = sub("gridlb_substation_utilisation_ratio")
ONLINE = sub("gridlb_substation_online")
#: Stale but online (offline ones are stale too; they are counted as offline).
STALE_ONLINE = f"{sub('gridlb_substation_stale')} == 1 and on (substation) {ONLINE} == 1"


def grid_overview() -> dashboard.Dashboard:
    d = frame("gridlb-overview", "Grid overview",
              "The whole grid at a glance (counts, totals, how utilisation is spread over the substations) and "
              "the $topk worst substations in detail. Prometheus: the balancer's view (gridlb_substation_*) "
              "and the agents' own readings (gridlb_agent_*). Every panel follows $substation.",
              [substation_variable(), topk_variable()])
    d = d.with_row(dashboard.Row("The grid at a glance"))
    d = d.with_panel(stats("Substations", "How many the balancer knows, and how many are in each condition "
                           "(0 is good except for online).", "none", [
        prom("A", f"count({UTIL})", "known"),
        prom("B", f"count({ONLINE} == 1) or vector(0)", "online"),
        prom("C", f"count({ONLINE} == 0) or vector(0)", "offline"),
        prom("D", f"count({STALE_ONLINE}) or vector(0)", "stale (online, silent)"),
        prom("E", f"count({sub('gridlb_substation_draining')} == 1) or vector(0)", "draining"),
        prom("F", f"count({sub('gridlb_substation_load_watts')} > {sub('gridlb_substation_reported_capacity_watts')})"
             " or vector(0)", "overloaded"),
    ], w=12, h=5))
    d = d.with_panel(stats("Grid load", "Totals over the selected substations.", "watt", [
        prom("A", f"sum({sub('gridlb_substation_load_watts')})", "load"),
        prom("B", f"sum({sub('gridlb_substation_capacity_watts')})", "capacity"),
        prom("C", f"sum({sub('gridlb_substation_headroom_watts')})", "headroom"),
        prom("D", f"sum({sub('gridlb_substation_granted_watts')})", "granted to EVs"),
    ], w=12, h=5))
    d = d.with_panel(graph("Grid load and capacity", "Sums over the selected substations: measured load, the "
                           "capacity the balancer plans with, the limit grants stay below, and the EVs' grants.",
                           "watt", [
        prom("A", f"sum({sub('gridlb_substation_load_watts')})", "load"),
        prom("B", f"sum({sub('gridlb_substation_capacity_watts')})", "capacity"),
        prom("C", f"sum({sub('gridlb_substation_limit_watts')})", "limit (capacity - margin)"),
        prom("D", f"sum({sub('gridlb_substation_granted_watts')})", "granted"),
        prom("E", f"sum({sub('gridlb_substation_reserved_watts')})", "reserved"),
    ]))
    d = d.with_panel(graph("Utilisation across substations", "The distribution of utilisation over the "
                           "selected substations: its quantiles and maximum, four lines whatever their number.",
                           "percentunit", [
        prom("A", f"max({UTIL})", "max"),
        prom("B", f"quantile(0.9, {UTIL})", "p90"),
        prom("C", f"quantile(0.5, {UTIL})", "median"),
        prom("D", f"min({UTIL})", "min"),
    ]))
    bands = ((None, 0.5, "< 50 %"), (0.5, 0.8, "50-80 %"), (0.8, 0.9, "80-90 %"), (0.9, 1.0, "90-100 %"),
             (1.0, None, "> 100 %"))
    band_targets = []
    for i, (low, high, name) in enumerate(bands):
        conds = [f"({UTIL} >= bool {low})" if low is not None else "",
                 f"({UTIL} < bool {high})" if high is not None else ""]
        band_targets.append(prom(chr(65 + i), f"sum({' * '.join(c for c in conds if c)})", name, instant=True))
    d = d.with_panel(ranking("Substations by utilisation band", "How many substations are in each band now.",
                             "none", band_targets, w=8))
    d = d.with_panel(listing("Fullest now (top $topk)", "The $topk substations with the highest utilisation "
                             "now, fullest first.", [prom("A", f"topk($topk, {UTIL})", table=True)], w=8))
    d = d.with_panel(listing("Least headroom now (online, $topk)", "Online substations with the least room "
                             "for new sessions.", [prom("A", f"bottomk($topk, {sub('gridlb_substation_headroom_watts')}"
                                                        f" and on (substation) {ONLINE} == 1)", table=True)],
                             w=8, desc=False))
    d = d.with_row(dashboard.Row("The $topk fullest substations over the time range"))
    d = d.with_panel(graph("Load vs capacity (fullest $topk)", "Measured load and planned capacity of the $topk "
                           "substations whose utilisation peaked highest in the time range.", "watt", [
        prom("A", worst(sub("gridlb_substation_load_watts"), UTIL), "{{substation}} load"),
        prom("B", worst(sub("gridlb_substation_capacity_watts"), UTIL), "{{substation}} capacity"),
    ], w=16, h=9, legend_table=True))
    d = d.with_panel(graph("Utilisation (fullest $topk)", "Utilisation of the same substations.", "percentunit",
                           [prom("A", worst(UTIL, UTIL), "{{substation}}")], w=8, h=9))
    d = d.with_panel(graph("Granted and reserved (fullest $topk)", "Power granted to the EVs there, and granted "
                           "since the last telemetry (not yet in the measured load).", "watt", [
        prom("A", worst(sub("gridlb_substation_granted_watts"), UTIL), "{{substation}} granted"),
        prom("B", worst(sub("gridlb_substation_reserved_watts"), UTIL), "{{substation}} reserved"),
    ], w=12))
    d = d.with_panel(graph("Agent readings (fullest $topk by EV load)", "The agents' own base load and EV load, "
                           "for the $topk substations with the most EV load in the time range.", "watt", [
        prom("A", worst(sub("gridlb_agent_base_load_watts"), sub("gridlb_agent_ev_load_watts")), "{{substation}} base"),
        prom("B", worst(sub("gridlb_agent_ev_load_watts"), sub("gridlb_agent_ev_load_watts")), "{{substation}} EV"),
    ], w=12))
    d = d.with_row(dashboard.Row("Balance"))
    d = d.with_panel(graph("Utilisation spread", "How evenly the load is spread: max - min and the standard "
                           "deviation of utilisation over the selected substations.", "percentunit", [
        prom("A", f"max({UTIL}) - min({UTIL})", "max - min"),
        prom("B", f"stddev({UTIL})", "standard deviation"),
    ]))
    d = d.with_panel(graph("Telemetry age (oldest $topk)", "Seconds since the last telemetry, for the $topk "
                           "substations heard from least recently in the time range.", "s", [
        prom("A", worst(sub("gridlb_substation_telemetry_age_seconds"), sub("gridlb_substation_telemetry_age_seconds")),
             "{{substation}}")]))
    d = d.with_row(dashboard.Row("Substations needing attention"))
    d = d.with_panel(listing("Offline now", "Substations the balancer sees offline (status, last will or lost). "
                             "Empty while every substation is online.",
                             [prom("A", f"{ONLINE} == 0", table=True)], w=6, h=7, sort_by="substation", desc=False))
    d = d.with_panel(listing("Stale or draining now", "Online but silent (stale) or drained by an operator. "
                             "Empty while none is.",
                             [prom("A", STALE_ONLINE, "stale", table=True),
                              prom("B", f"{sub('gridlb_substation_draining')} == 1", "draining", table=True)],
                             w=6, h=7, sort_by="substation", desc=False))
    d = d.with_panel(ranking("Overload time in range (top $topk)", "Seconds the measured load was above the "
                             "reported capacity, worst $topk.", "s", [
        prom("A", f"topk($topk, sum by (substation) (increase({sub('gridlb_substation_overload_seconds_total')}"
             "[$__range])))", "{{substation}}", instant=True)], w=6, h=7))
    return d.with_panel(ranking("Went stale in range (top $topk)", "Times the telemetry went stale, worst $topk.",
                                "none", [
        prom("A", f"topk($topk, sum by (substation) (increase({sub('gridlb_stale_telemetry_total')}[$__range])))",
             "{{substation}}", instant=True)], w=6, h=7))


def balancer() -> dashboard.Dashboard:
    d = frame("gridlb-balancer", "Balancer",
              "Decisions by outcome and reason, decision latency, the waiting line and refused payloads. "
              "Nothing here is per substation or per EV: every series is bounded by outcomes and reasons.")
    d = d.with_row(dashboard.Row("Decisions"))
    d = d.with_panel(graph("Decisions by outcome", "Answers per second by outcome.", "reqps", [
        prom("A", "sum by (outcome) (rate(gridlb_decisions_total[$__rate_interval]))", "{{outcome}}")]))
    d = d.with_panel(graph("Decisions by reason", "Answers that carry a reason, per second.", "reqps", [
        prom("A", 'sum by (outcome, reason) (rate(gridlb_decisions_total{reason!=""}[$__rate_interval]))',
             "{{outcome}}: {{reason}}")]))
    d = d.with_panel(listing("Decisions in the time range", "Answers by outcome and reason in the range.", [
        prom("A", "sum by (outcome, reason) (increase(gridlb_decisions_total[$__range]))", table=True)], w=12))
    d = d.with_panel(graph("Decision latency", "Time to decide and publish the answers to one request or "
                           "release.", "s", [
        prom("A", "histogram_quantile(0.5, sum by (le) (rate(gridlb_decision_latency_seconds_bucket"
             "[$__rate_interval])))", "p50"),
        prom("B", "histogram_quantile(0.99, sum by (le) (rate(gridlb_decision_latency_seconds_bucket"
             "[$__rate_interval])))", "p99")]))
    d = d.with_row(dashboard.Row("Queue and sessions"))
    d = d.with_panel(graph("Queue length and sessions", "Requests waiting, sessions running, EVs with an open "
                           "request.", "none", [
        prom("A", "gridlb_queue_length", "waiting"), prom("B", "gridlb_sessions", "sessions"),
        prom("C", "gridlb_open_requests", "open requests")]))
    d = d.with_panel(graph("Queue wait (placed from the queue)", "How long requests placed from the queue "
                           "waited.", "s", [
        prom("A", "histogram_quantile(0.5, sum by (le) (rate(gridlb_queue_wait_seconds_bucket[$__rate_interval])))",
             "p50"),
        prom("B", "histogram_quantile(0.99, sum by (le) (rate(gridlb_queue_wait_seconds_bucket"
             "[$__rate_interval])))", "p99"),
        prom("C", "sum(rate(gridlb_queue_wait_seconds_sum[$__rate_interval])) / "
             "sum(rate(gridlb_queue_wait_seconds_count[$__rate_interval]))", "mean")]))
    d = d.with_row(dashboard.Row("Input"))
    d = d.with_panel(graph("Refused payloads", "Payloads refused at the boundary, by topic kind and reason.",
                           "reqps", [prom("A", "sum by (kind, reason) (rate(gridlb_rejected_payloads_total"
                                           "[$__rate_interval]))", "{{kind}}: {{reason}}")]))
    return d.with_panel(graph("Balancer MQTT traffic", "Messages the balancer received and published.", "reqps", [
        prom("A", 'rate(gridlb_mqtt_messages_received_total{job="balancer"}[$__rate_interval])', "received"),
        prom("B", 'rate(gridlb_mqtt_messages_published_total{job="balancer"}[$__rate_interval])', "published")]))


def _flux_filter(measurement: str, field: str) -> str:
    return f'filter(fn: (r) => r._measurement == "{measurement}" and r._field == "{field}")'


SUBSTATION_FLUX = "filter(fn: (r) => r.substation_id =~ /^${substation:regex}$/)"


def ev_sessions() -> dashboard.Dashboard:
    d = frame("gridlb-ev-sessions", "EV sessions",
              "Sessions and EV power (Prometheus) and every answer to every EV and the energy delivered "
              "(InfluxDB, written by the recorder; Flux). Per-substation panels show the $topk busiest; EV ids "
              "are fields in InfluxDB (never tags), so one EV's history is a lookup, not a series.",
              [substation_variable(), topk_variable(),
               dashboard.TextBoxVariable("ev_id").label("EV id (history below)").default_value("EV_0001")])
    d = d.with_row(dashboard.Row("Sessions (Prometheus)"))
    d = d.with_panel(graph("Sessions and EV power, all selected substations", "Sessions the balancer placed and "
                           "the agents run, and the power the EVs draw, summed.", "none", [
        prom("A", f"sum({sub('gridlb_substation_active_sessions')})", "sessions (balancer)"),
        prom("B", f"sum({sub('gridlb_agent_sessions')})", "sessions (agents)"),
    ], w=8))
    d = d.with_panel(graph("Busiest substations ($topk, sessions)", "Sessions on the $topk substations with the "
                           "most sessions in the time range.", "none", [
        prom("A", worst(sub("gridlb_substation_active_sessions"), sub("gridlb_substation_active_sessions")),
             "{{substation}}")], w=8))
    d = d.with_panel(graph("EV power (top $topk substations)", "Power the EVs draw on the $topk substations with "
                           "the most, and on all selected substations together.", "watt", [
        prom("A", f"sum({sub('gridlb_agent_ev_load_watts')})", "all selected"),
        prom("B", worst(sub("gridlb_agent_ev_load_watts"), sub("gridlb_agent_ev_load_watts")), "{{substation}}")],
        w=8))
    d = d.with_panel(graph("EV fleet: requests and answers", "The simulated fleet's requests and the answers "
                           "it received, by status.", "reqps", [
        prom("A", "sum(rate(gridlb_ev_requests_total[$__rate_interval]))", "requests"),
        prom("B", "sum by (status) (rate(gridlb_ev_answers_total[$__rate_interval]))", "{{status}}")], w=8))
    d = d.with_panel(graph("EV fleet: answer latency", "Request first sent to first answer.", "s", [
        prom("A", "histogram_quantile(0.5, sum by (le) (rate(gridlb_ev_answer_latency_seconds_bucket"
             "[$__rate_interval])))", "p50"),
        prom("B", "histogram_quantile(0.99, sum by (le) (rate(gridlb_ev_answer_latency_seconds_bucket"
             "[$__rate_interval])))", "p99")], w=8))
    d = d.with_panel(stats("EV fleet: charging, connected / energy drawn in range", "EVs charging now, EVs "
                           "connected, and the energy drawn on the selected substations in the range.", "none", [
        prom("A", "sum(gridlb_ev_active_sessions)", "charging now"),
        prom("B", 'sum(gridlb_mqtt_connected{job="ev_clients"})', "EVs connected"),
        prom("C", f"sum(avg_over_time({sub('gridlb_agent_ev_load_watts')}[$__range])) * $__range_s / 3600",
             "energy drawn (Wh, wall clock)")], w=8, h=8))
    d = d.with_row(dashboard.Row("Assignments and energy (InfluxDB)"))
    assignments = _flux_filter("ev_assignment", "granted_kw")
    d = d.with_panel(graph("Assignments by status", "Answers per window by status (each answer is one point).",
                           "none", [flux("A", assignments, 'group(columns: ["status"])',
                                         "aggregateWindow(every: v.windowPeriod, fn: count, createEmpty: false)",
                                         'rename(columns: {_value: "answers"})')], ds=INFLUX))
    d = d.with_panel(graph("Mean grant, selected substations", "Mean power granted per assignment over the "
                           "selected substations.", "kwatt", [
        flux("A", assignments, 'filter(fn: (r) => r.status == "assigned")', SUBSTATION_FLUX, "group()",
             "aggregateWindow(every: v.windowPeriod, fn: mean, createEmpty: false)")], ds=INFLUX))
    d = d.with_panel(ranking("Answers by status (range)", "", "none", [
        flux("A", assignments, 'group(columns: ["status"])', "count()", "group()")], w=6, ds=INFLUX))
    d = d.with_panel(ranking("Rejections by reason (range)", "", "none", [
        flux("A", assignments, 'filter(fn: (r) => r.status == "rejected")', 'group(columns: ["reason"])', "count()",
             "group()")], w=6, ds=INFLUX))
    d = d.with_panel(ranking("Energy delivered, top $topk substations (range)", "From ended sessions.", "kwatth", [
        flux("A", _flux_filter("session_event", "energy_delivered_kwh"), 'filter(fn: (r) => r.event == "ended")',
             SUBSTATION_FLUX, 'group(columns: ["substation_id"])', "sum()", "group()", "top(n: ${topk})")],
        w=6, ds=INFLUX))
    d = d.with_panel(ranking("Sessions ended by reason (range)", "", "none", [
        flux("A", _flux_filter("session_event", "session_id"), 'filter(fn: (r) => r.event == "ended")',
             'group(columns: ["reason"])', "count()", "group()")], w=6, ds=INFLUX))
    return d.with_panel(table.Panel().title("Answers to EV $ev_id").description(
        "Every answer to one EV in the time range: its ev_id is a field, so the answers are pivoted to rows "
        "and filtered (one lookup over the answers in the range, no series per EV).").datasource(INFLUX)
        .span(24).height(8).targets([
            flux("A", 'filter(fn: (r) => r._measurement == "ev_assignment")',
                 'pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")',
                 'filter(fn: (r) => r.ev_id == "${ev_id}")', "group()",
                 'keep(columns: ["_time", "status", "substation_id", "reason", "granted_kw", "position", "eta_s"])',
                 'sort(columns: ["_time"])')]))


def pipeline_health() -> dashboard.Dashboard:
    d = frame("gridlb-pipeline", "Pipeline health",
              "Scrape targets, MQTT connections of every service (counted per service: the agents hold one "
              "connection per substation), the recorder's writes to InfluxDB and the HTTP API.", [topk_variable()])
    d = d.with_row(dashboard.Row("Targets and MQTT"))
    d = d.with_panel(stats("Scrape targets up", "1 when Prometheus's last scrape of the job worked.", "none", [
        prom("A", "min by (job) (up)", "{{job}}")], w=8))
    d = d.with_panel(stats("MQTT connections", "Connections up per service (the agents: one per substation; the "
                           "fleet counts its EVs).", "none", [
        prom("A", "sum by (job) (gridlb_mqtt_connected)", "{{job}}")], w=8))
    d = d.with_panel(listing("MQTT clients disconnected now", "Service connections that are down. Empty while "
                             "every one is up.", [prom("A", 'gridlb_mqtt_connected{job!="ev_clients"} == 0',
                                                       table=True)], w=8, h=5, sort_by="client", desc=False))
    d = d.with_panel(ranking("MQTT reconnects in range (top $topk)", "Connections lost and made again, worst "
                             "$topk clients.", "none", [
        prom("A", "topk($topk, sum by (job, client) (increase(gridlb_mqtt_reconnects_total[$__range])))",
             "{{job}} {{client}}", instant=True)]))
    d = d.with_panel(graph("MQTT messages per service", "Messages received and published per second.", "reqps", [
        prom("A", "sum by (job) (rate(gridlb_mqtt_messages_received_total[$__rate_interval]))", "{{job}} received"),
        prom("B", "sum by (job) (rate(gridlb_mqtt_messages_published_total[$__rate_interval]))",
             "{{job}} published")], w=8))
    d = d.with_panel(graph("Scrape duration and size", "How long each scrape takes and how many samples it "
                           "returns (the balancer's grows with substations: about 15 per substation).", "s", [
        prom("A", "max by (job) (scrape_duration_seconds)", "{{job}} duration"),
        prom("B", "max by (job) (scrape_samples_scraped)", "{{job}} samples")], w=8))
    d = d.with_row(dashboard.Row("Recorder (InfluxDB writes)"))
    d = d.with_panel(graph("Points written / retried / dropped", "The recorder's points per second.", "none", [
        prom("A", "sum(rate(gridlb_recorder_points_written_total[$__rate_interval]))", "written"),
        prom("B", "sum(rate(gridlb_recorder_points_retried_total[$__rate_interval]))", "retried"),
        prom("C", "sum by (reason) (rate(gridlb_recorder_points_dropped_total[$__rate_interval]))",
             "dropped: {{reason}}"),
        prom("D", "sum(rate(gridlb_recorder_write_errors_total[$__rate_interval]))", "write errors")], w=8))
    d = d.with_panel(graph("Recorder buffer", "Points waiting in the bounded buffer.", "none", [
        prom("A", "sum(gridlb_recorder_buffer_points)", "points waiting")], w=8))
    d = d.with_panel(graph("Write latency", "Duration of successful batch writes.", "s", [
        prom("A", "histogram_quantile(0.5, sum by (le) (rate(gridlb_recorder_write_latency_seconds_bucket"
             "[$__rate_interval])))", "p50"),
        prom("B", "histogram_quantile(0.99, sum by (le) (rate(gridlb_recorder_write_latency_seconds_bucket"
             "[$__rate_interval])))", "p99")], w=8))
    d = d.with_row(dashboard.Row("HTTP API"))
    d = d.with_panel(graph("API requests", "Requests per second by route template and status.", "reqps", [
        prom("A", "sum by (route, status) (rate(gridlb_api_requests_total[$__rate_interval]))",
             "{{route}} {{status}}")]))
    return d.with_panel(graph("API request duration", "p99 per route template.", "s", [
        prom("A", "histogram_quantile(0.99, sum by (le, route) (rate(gridlb_api_request_duration_seconds_bucket"
             "[$__rate_interval])))", "p99 {{route}}")]))


#: Panels that list problems (offline, stale, draining substations; disconnected clients): empty while all is
#: well, so a healthy system returns no data for them. tests/integration/test_dashboards_at_scale.py makes the
#: problems happen and requires their data there.
PROBLEM_LISTS = frozenset({"Offline now", "Stale or draining now", "MQTT clients disconnected now"})

DASHBOARDS = {"grid-overview.json": grid_overview, "balancer.json": balancer, "ev-sessions.json": ev_sessions,
              "pipeline-health.json": pipeline_health}


def render(name: str) -> str:
    """The JSON text of dashboard file ``name``: panels numbered in order, keys sorted, 2-space indent."""
    doc = json.loads(JSONEncoder().encode(DASHBOARDS[name]().build()))
    for number, panel in enumerate(_all_panels(doc["panels"]), 1):
        panel["id"] = number
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _all_panels(panels: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", []))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.grafana_dashboards",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        text, path = render(name), args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"not what monitoring/grafana_dashboards.py builds: {', '.join(stale)} "
              "(run python -m monitoring.grafana_dashboards)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
