import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodecryptor.core.ports import PortRange, PortSpecError, parse_port_spec


def test_default_spec():
    assert parse_port_spec("2379-2380,6443") == (
        PortRange("tcp", 2379, 2380),
        PortRange("tcp", 6443, 6443),
    )


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("udp/8472", (PortRange("udp", 8472, 8472),)),
        ("sctp/9000-9010", (PortRange("sctp", 9000, 9010),)),
        (" 6443 , 2379-2380 ", (PortRange("tcp", 2379, 2380), PortRange("tcp", 6443, 6443))),
        ("TCP/1-1", (PortRange("tcp", 1, 1),)),
        ("2379,2380", (PortRange("tcp", 2379, 2380),)),  # adjacent entries merge
        ("10-20,15-30,udp/15", (PortRange("tcp", 10, 30), PortRange("udp", 15, 15))),
        ("", ()),
    ],
)
def test_valid_specs(spec, expected):
    assert parse_port_spec(spec) == expected


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("0", "outside 1-65535"),
        ("70000", "outside 1-65535"),
        ("6443-2379", "below its start"),
        ("abc", "not a port number"),
        ("icmp/5", "unknown protocol"),
        ("6443,,2379", "empty entry"),
        ("-5", "not a port number"),
        ("1-", "not a port number"),
    ],
)
def test_invalid_specs_name_the_entry(spec, fragment):
    with pytest.raises(PortSpecError) as exc:
        parse_port_spec(spec)
    assert fragment in str(exc.value)


ranges = st.tuples(
    st.sampled_from(["tcp", "udp", "sctp"]), st.integers(1, 65535), st.integers(0, 300)
).map(lambda t: (t[0], t[1], min(65535, t[1] + t[2])))


@given(st.lists(ranges, min_size=1, max_size=12))
def test_parse_covers_exactly_the_listed_ports(entries):
    spec = ",".join(f"{p}/{a}-{b}" for p, a, b in entries)
    parsed = parse_port_spec(spec)
    for proto in ("tcp", "udp", "sctp"):
        want = {port for p, a, b in entries if p == proto for port in range(a, b + 1)}
        got = {port for r in parsed if r.protocol == proto for port in range(r.first, r.last + 1)}
        assert got == want
    # merged: per protocol, ranges are sorted, disjoint and not adjacent
    for a, b in zip(parsed, parsed[1:]):
        if a.protocol == b.protocol:
            assert a.last + 1 < b.first


@given(st.lists(ranges, min_size=1, max_size=8))
def test_round_trip_through_str(entries):
    parsed = parse_port_spec(",".join(f"{p}/{a}-{b}" for p, a, b in entries))
    assert parse_port_spec(",".join(str(r) for r in parsed)) == parsed
