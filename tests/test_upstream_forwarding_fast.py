"""Which caller headers go upstream: the split name/prefix sets and the per-name memory answer exactly
as the plain reading of ``forward_headers`` does, and a reverse target is the same upstream every time."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from auditgate.routing.upstreams import (
    DEFAULT_FORWARD_HEADERS,
    FRAMING_HEADERS,
    Upstream,
    UpstreamTable,
)


def plain_forwards(forward_headers: tuple[str, ...], name: str) -> bool:
    """The rule as it reads: framing headers, an exact name, or a "prefix*" entry."""
    if name in FRAMING_HEADERS:
        return True
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in forward_headers)


NAME_PARTS = ["x-stainless-", "accept", "-encoding", "content-", "type", "host", "openai-", "beta", "x-", "a", "*", "É"]
names = st.lists(st.one_of(st.sampled_from(NAME_PARTS), st.text(max_size=4)), max_size=4).map("".join)
forward_lists = st.one_of(st.just(DEFAULT_FORWARD_HEADERS),
                          st.lists(st.one_of(names, names.map(lambda n: n + "*")), max_size=5).map(tuple))


@settings(max_examples=500, deadline=None)
@given(forward_lists, st.lists(names, max_size=8))
def test_forwards_answers_as_the_plain_rule(forward_headers, header_names) -> None:
    upstream = Upstream(host="api.example", forward_headers=forward_headers)
    for name in header_names:
        lowered = name.lower()
        assert upstream.forwards(lowered) == plain_forwards(forward_headers, lowered)
        raw = name.encode("utf-8").decode("latin-1").encode("latin-1")
        # Asked twice: once worked out, once from the memory.
        for _ in range(2):
            assert upstream.forwards_field(raw) == plain_forwards(forward_headers, raw.decode("latin-1").lower())


def test_the_name_memory_stays_small() -> None:
    upstream = Upstream(host="api.example", forward_headers=("only-this",))
    for i in range(3000):
        assert not upstream.forwards_field(f"x-caller-{i}".encode())
    assert upstream.forwards_field(b"Only-This")
    assert len(upstream._forwarded_fields) <= 512


def test_a_reverse_target_is_worked_out_once_and_stays_what_it_was() -> None:
    configured = Upstream(host="api.example", port=443, key_env="OTHER_KEY")
    table = UpstreamTable(upstreams=(configured,))
    assert table.reverse_target("API.example", 443) is configured
    default = table.reverse_target("Local.Test", 8080)
    assert default == Upstream(host="local.test", port=8080)
    assert table.reverse_target("Local.Test", 8080) is default
    assert table.route("api.example", 443, reverse=False) is configured
    assert table.route("local.test", 8080, reverse=False) is None
