"""Regional topics (issue 12): the default region keeps today's topics, region R lives under <prefix>/region/R/."""

from __future__ import annotations

import pytest

from grid_protocol.messages import DEFAULT_REGION
from grid_protocol.topics import CHANNELS, TopicKind, Topics


def _built(topics: Topics, kind: TopicKind) -> str:
    return topics.topic(kind, "x-1" if "{id}" in CHANNELS[kind].template else None)


@pytest.mark.parametrize("kind", list(TopicKind))
def test_every_channel_builds_and_parses_in_default_and_named_regions(kind: TopicKind) -> None:
    grid = Topics("grid/v1")
    east = grid.for_region("east")
    id_ = "x-1" if "{id}" in CHANNELS[kind].template else None
    tail = CHANNELS[kind].template.replace("{id}", "x-1")
    assert _built(grid, kind) == f"grid/v1/{tail}"  # today's topic, unchanged
    assert _built(east, kind) == f"grid/v1/region/east/{tail}"
    assert grid.parse(_built(grid, kind)) == (kind, id_)
    assert east.parse(_built(east, kind)) == (kind, id_)
    # A region's parser sees only its own region's topics.
    assert grid.parse(_built(east, kind)) is None
    assert east.parse(_built(grid, kind)) is None
    assert east.parse(_built(grid.for_region("west"), kind)) is None
    # The all-regions parser sees both, with the region.
    assert grid.parse_any_region(_built(grid, kind)) == (DEFAULT_REGION, kind, id_)
    assert east.parse_any_region(_built(east, kind)) == ("east", kind, id_)
    assert grid.parse_any_region(_built(east, kind)) == ("east", kind, id_)


def test_default_region_is_todays_topics_and_named_default_is_not_a_topic() -> None:
    grid = Topics()
    assert grid.for_region(DEFAULT_REGION).request("ev1") == grid.request("ev1") == "grid/v1/ev/ev1/request"
    assert grid.root == grid.prefix == "grid/v1" and grid.region == DEFAULT_REGION
    assert grid.parse_any_region("grid/v1/region/default/ev/ev1/request") is None
    assert grid.parse_any_region("grid/v1/region/ev/ev1/request") is None
    assert grid.parse_any_region("grid/v1/region/a+b/ev/ev1/request") is None
    assert grid.parse_any_region("grid/v1/region/east") is None
    assert grid.parse_any_region("grid/v1x/ev/ev1/request") is None
    assert grid.parse_any_region("other/ev/ev1/request") is None


def test_filters_of_a_region_and_of_every_region() -> None:
    grid, east = Topics(), Topics(region="east")
    assert grid.filter(TopicKind.EV_REQUEST) == "grid/v1/ev/+/request"
    assert east.filter(TopicKind.EV_REQUEST) == "grid/v1/region/east/ev/+/request"
    assert east.filter(TopicKind.BALANCER_STATUS) == "grid/v1/region/east/balancer/status"
    assert east.filters_all_regions(TopicKind.SUBSTATION_STATE) == (
        "grid/v1/substation/+/state", "grid/v1/region/+/substation/+/state")
    assert grid.filters_all_regions(TopicKind.BALANCER_STATUS) == (
        "grid/v1/balancer/status", "grid/v1/region/+/balancer/status")
    assert grid.filters_all_regions(TopicKind.EV_ASSIGNMENT, "ev7") == (
        "grid/v1/ev/ev7/assignment", "grid/v1/region/+/ev/ev7/assignment")
    with pytest.raises(ValueError):
        grid.filters_all_regions(TopicKind.EV_ASSIGNMENT, "a/b")


def test_reply_root_is_one_per_grid_and_bad_regions_are_refused() -> None:
    assert Topics(region="east").reply_root() == Topics().reply_root() == "grid/v1/reply/"
    for bad in ("", "a/b", "+", "#", "x" * 65):
        with pytest.raises(ValueError):
            Topics(region=bad)
    assert Topics("site/a", "north").balancer_status() == "site/a/region/north/balancer/status"
