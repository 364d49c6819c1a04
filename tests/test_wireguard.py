"""Reading the WireGuard device: the UAPI text protocol, and a real wireguard-go device."""

import base64
import json
import os
import subprocess
import sys
import time

import pytest

from nodecryptor.node.wireguard import parse_uapi

UAPI_REPLY = """private_key=a8dac1d8a70a751f0f699fb14ba1cff7b79cf4fbd8f09f44c6e6a90d0369604d
listen_port=51871
fwmark=3584
public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33
preshared_key=0000000000000000000000000000000000000000000000000000000000000000
protocol_version=1
endpoint=192.168.50.22:51871
last_handshake_time_sec=1764000000
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
allowed_ip=192.168.50.22/32
allowed_ip=10.244.2.0/24
allowed_ip=fd00:10:244:2::/64
public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376
endpoint=[fd50::10]:51871
last_handshake_time_sec=0
allowed_ip=192.168.50.10/32
errno=0

"""


def test_parse_uapi():
    port, fwmark, peers = parse_uapi(UAPI_REPLY)
    assert (port, fwmark) == (51871, 0xE00)
    assert len(peers) == 2
    assert (
        peers[0].public_key
        == base64.b64encode(
            bytes.fromhex("b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33")
        ).decode()
    )
    assert [str(n) for n in peers[0].allowed_ips] == [
        "192.168.50.22/32",
        "10.244.2.0/24",
        "fd00:10:244:2::/64",
    ]
    assert peers[0].endpoint == "192.168.50.22:51871" and peers[0].last_handshake == 1764000000
    assert peers[1].endpoint == "[fd50::10]:51871" and peers[1].last_handshake is None


def test_parse_uapi_error():
    with pytest.raises(ValueError, match="errno=19"):
        parse_uapi("errno=19\n\n")


READ_SCRIPT = """
import json, sys
from nodecryptor.node.wireguard import read_state
s = read_state(sys.argv[1])
print(json.dumps({"present": s.present, "up": s.up, "mtu": s.mtu, "port": s.listen_port,
                  "fwmark": s.fwmark, "ifindex": s.ifindex, "error": s.error,
                  "peers": None if s.peers is None else
                  [[p.public_key, [str(n) for n in p.allowed_ips]] for p in s.peers]}))
"""


def read_in(ns, ifname):
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", READ_SCRIPT, ifname],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return json.loads(out)


def test_wireguard_go_device(netns, wireguard_go, tmp_path):
    ns = netns("wg")
    ifname = f"ncwg{os.getpid() % 100000}"
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "wireguard-go", "-f", ifname],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sock = f"/var/run/wireguard/{ifname}.sock"
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(sock), "wireguard-go did not create its UAPI socket"
        key = tmp_path / "key"
        key.write_text(subprocess.run(["wg", "genkey"], capture_output=True, text=True).stdout)
        peer = subprocess.run(
            ["wg", "pubkey"],
            input=subprocess.run(["wg", "genkey"], capture_output=True, text=True).stdout,
            capture_output=True,
            text=True,
        ).stdout.strip()

        def run(*c):
            return subprocess.run(["ip", "netns", "exec", ns, *c], check=True)

        run(
            "wg",
            "set",
            ifname,
            "listen-port",
            "51871",
            "fwmark",
            "0xe00",
            "private-key",
            str(key),
            "peer",
            peer,
            "allowed-ips",
            "192.168.50.22/32,10.244.2.0/24",
        )
        run("ip", "link", "set", ifname, "mtu", "1420")
        state = read_in(ns, ifname)
        assert state["present"] and not state["up"] and state["mtu"] == 1420
        assert (state["port"], state["fwmark"]) == (51871, 0xE00)
        assert state["peers"] == [[peer, ["192.168.50.22/32", "10.244.2.0/24"]]]
        run("ip", "link", "set", ifname, "up")
        assert read_in(ns, ifname)["up"]
    finally:
        proc.terminate()  # lets wireguard-go remove its socket and device
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if os.path.exists(f"/var/run/wireguard/{ifname}.sock"):
            os.unlink(f"/var/run/wireguard/{ifname}.sock")
    gone = read_in(ns, ifname)
    assert not gone["present"] and gone["error"] == "device absent"


@pytest.mark.parametrize(
    "family,raw,expected",
    [
        (2, "c0:a8:32:02", "192.168.50.2"),  # pyroute2 0.9.7, kernel WireGuard
        (2, b"\x0a\xf4\x02\x00", "10.244.2.0"),
        (2, "10.244.2.0", "10.244.2.0"),
        (10, ":".join(["fd", "00"] + ["00"] * 13 + ["22"]), "fd00::22"),
        (10, bytes.fromhex("fd500000000000000000000000000022"), "fd50::22"),
        (10, "fd50::22", "fd50::22"),
        (10, "fd50:0:0:0:0:0:0:22", "fd50::22"),  # 8 groups of text is not hex bytes
    ],
)
def test_allowed_ip_address_forms(family, raw, expected):
    from nodecryptor.node.wireguard import decode_address

    assert str(decode_address(family, raw)) == expected
