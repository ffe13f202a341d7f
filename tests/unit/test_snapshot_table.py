"""The table ``make run`` prints for each closed window (roles.snapshot_table): count and
late per region, and with aggregates the unique users and the top page (issue 18)."""
from __future__ import annotations

from aggregator.roles import TOP_PAGE_CHARS, snapshot_table

WS = 1_700_000_040_000


def snap(region: str, count: int, **aggs: object) -> dict:
    return {"region": region, "window_start": WS, "window_end": WS + 60_000, "count": count, "late": 1,
            "late_by_reason": {}, "emitted_at": WS + 65_000, **aggs}


def test_table_with_unique_users_and_top_page() -> None:
    long = "https://shop.example.com/" + "x" * 100
    text = snapshot_table([
        snap("us-east", 5, unique_users=5, top_urls=[{"url": long, "count": 3}], client_delay_ms=None),
        snap("eu-west", 4012, unique_users=3871, top_urls=[{"url": "/p/0", "count": 412}, {"url": "/p/1", "count": 9}],
             client_delay_ms={"p50": 1.0, "p90": 2.0, "p99": 3.0}),
        snap("ap-south", 0, unique_users=0, top_urls=[], client_delay_ms=None),
    ])
    lines = text.strip().splitlines()
    assert lines[0] == "window 22:14:00-22:15:00 UTC"
    assert lines[1].split() == ["region", "count", "late", "users", "top", "page", "visits"]
    assert [ln.split() for ln in lines[2:]] == [
        ["ap-south", "0", "1", "0", "-", "-"],
        ["eu-west", "4012", "1", "3871", "/p/0", "412"],
        ["us-east", "5", "1", "5", long[:TOP_PAGE_CHARS - 4] + "...", "3"],
        ["total", "4017", "3"],
    ]
    assert len({len(ln) for ln in lines[2:4]}) == 1  # the columns line up


def test_table_without_aggregates_is_as_before() -> None:
    lines = snapshot_table([snap("eu-west", 7), snap("us-east", 2)]).strip().splitlines()
    assert lines[1].split() == ["region", "count", "late"]
    assert [ln.split() for ln in lines[2:]] == [["eu-west", "7", "1"], ["us-east", "2", "1"], ["total", "9", "2"]]
