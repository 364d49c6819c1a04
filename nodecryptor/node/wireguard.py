"""Read the WireGuard device: link state from rtnetlink, configuration from WireGuard itself.

Kernel WireGuard answers over generic netlink (pyroute2 ``WireGuard``); ``wireguard-go`` answers
only on its UAPI socket (``/var/run/wireguard/<ifname>.sock``, text protocol ``get=1``). Both are
tried, so the agent works with either implementation. Nothing here raises for an expected
condition: a missing device or unreadable peers are reported in the returned WgState.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import logging
import os
import socket

from pyroute2 import IPRoute

from nodecryptor.core.log import kv
from nodecryptor.core.model import WgPeer, WgState

log = logging.getLogger(__name__)

UAPI_DIR = "/var/run/wireguard"
IFF_UP = 0x1


def _link(ifname: str) -> tuple[int, bool, int] | None:
    """(ifindex, up, mtu) or None when the device does not exist."""
    with IPRoute() as ipr:
        try:
            links = ipr.link("get", ifname=ifname)
        except Exception as e:  # pyroute2 raises NetlinkError(ENODEV) for a missing device
            if getattr(e, "code", None) in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        if not links:
            return None
        msg = links[0]
        return msg["index"], bool(msg["flags"] & IFF_UP), msg.get_attr("IFLA_MTU") or 0


def parse_uapi(text: str) -> tuple[int, int, list[WgPeer]]:
    """Parse the reply of a UAPI ``get=1``: returns (listen_port, fwmark, peers).

    Keys are hex in the UAPI and converted to base64, the form CiliumNode annotations use.
    Raises ValueError when the reply carries a non-zero errno.
    """
    listen_port = fwmark = 0
    peers: list[WgPeer] = []
    current: dict | None = None

    def finish():
        if current is not None:
            peers.append(
                WgPeer(
                    public_key=current["key"],
                    allowed_ips=tuple(current["allowed"]),
                    endpoint=current.get("endpoint"),
                    last_handshake=current.get("handshake"),
                    rx_bytes=current.get("rx", 0),
                    tx_bytes=current.get("tx", 0),
                )
            )

    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "errno" and value.strip() != "0":
            raise ValueError(f"wireguard UAPI errno={value.strip()}")
        if key == "listen_port":
            listen_port = int(value)
        elif key == "fwmark":
            fwmark = int(value)
        elif key == "public_key":
            finish()
            current = {"key": base64.b64encode(bytes.fromhex(value)).decode(), "allowed": []}
        elif current is None:
            continue
        elif key == "allowed_ip":
            current["allowed"].append(ipaddress.ip_network(value, strict=False))
        elif key == "endpoint":
            current["endpoint"] = value
        elif key == "last_handshake_time_sec":
            current["handshake"] = float(value) if int(value) else None
        elif key in ("rx_bytes", "tx_bytes"):
            current[key[:2]] = int(value)
    finish()
    return listen_port, fwmark, peers


def _read_uapi(ifname: str, uapi_dir: str) -> tuple[int, int, list[WgPeer]] | None:
    path = os.path.join(uapi_dir, f"{ifname}.sock")
    if not os.path.exists(path):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        s.connect(path)
        s.sendall(b"get=1\n\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
            if b"\n\n" in b"".join(chunks[-2:]):
                break
    return parse_uapi(b"".join(chunks).decode())


def decode_address(family: int, raw) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An allowed-IP address as pyroute2 hands it over: raw bytes, colon-separated hex bytes
    (pyroute2 0.9.7 on kernel WireGuard: ``"c0:a8:32:02"``), or address text."""
    size = 4 if family == socket.AF_INET else 16
    if isinstance(raw, (bytes, bytearray)):
        return ipaddress.ip_address(bytes(raw[:size]))
    text = str(raw).split("/")[0]
    parts = text.split(":")
    if len(parts) == size and all(len(p) == 2 for p in parts):
        return ipaddress.ip_address(bytes.fromhex("".join(parts)))
    return ipaddress.ip_address(text)


def _decode_allowed(entry) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    family = entry.get_attr("WGALLOWEDIP_A_FAMILY")
    addr = decode_address(family, entry.get_attr("WGALLOWEDIP_A_IPADDR"))
    cidr = entry.get_attr("WGALLOWEDIP_A_CIDR_MASK")
    return ipaddress.ip_network(f"{addr}/{cidr}", strict=False)


def _read_genl(ifname: str) -> tuple[int, int, list[WgPeer]] | None:
    try:
        from pyroute2 import WireGuard

        with WireGuard() as wg:
            msgs = wg.info(ifname)
    except Exception as e:  # no wireguard genl family (module absent), or device not kernel WG
        log.debug("wireguard genetlink unavailable", extra=kv(ifname=ifname, error=str(e)))
        return None
    listen_port = fwmark = 0
    peers: list[WgPeer] = []
    for msg in msgs:
        listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
            key = peer.get_attr("WGPEER_A_PUBLIC_KEY")
            if isinstance(key, (bytes, bytearray)):
                key = base64.b64encode(bytes(key)).decode()
            allowed = tuple(_decode_allowed(a) for a in peer.get_attr("WGPEER_A_ALLOWEDIPS") or [])
            hs = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            seconds = None
            if isinstance(hs, dict):
                seconds = float(hs.get("tv_sec", 0)) or None
            endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
            if isinstance(endpoint, dict):
                addr, port = endpoint.get("addr"), endpoint.get("port")
                endpoint = f"[{addr}]:{port}" if addr and ":" in str(addr) else f"{addr}:{port}"
            peers.append(
                WgPeer(
                    public_key=str(key),
                    allowed_ips=allowed,
                    endpoint=str(endpoint) if endpoint else None,
                    last_handshake=seconds,
                    rx_bytes=int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
                    tx_bytes=int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
                )
            )
    return listen_port, fwmark, peers


def read_state(ifname: str, uapi_dir: str = UAPI_DIR) -> WgState:
    """Everything nodecryptor needs to know about the WireGuard device right now."""
    try:
        link = _link(ifname)
    except Exception as e:
        return WgState(ifname=ifname, error=f"rtnetlink: {e}")
    if link is None:
        return WgState(ifname=ifname, present=False, error="device absent")
    ifindex, up, mtu = link
    config = None
    error = None
    try:
        config = _read_uapi(ifname, uapi_dir)
    except (OSError, ValueError) as e:
        error = f"uapi: {e}"
    if config is None:
        config = _read_genl(ifname)
    if config is None:
        return WgState(
            ifname=ifname,
            ifindex=ifindex,
            present=True,
            up=up,
            mtu=mtu,
            peers=None,
            error=error
            or "configuration unreadable (no UAPI socket, no WireGuard generic netlink)",
        )
    listen_port, fwmark, peers = config
    return WgState(
        ifname=ifname,
        ifindex=ifindex,
        present=True,
        up=up,
        mtu=mtu,
        listen_port=listen_port,
        fwmark=fwmark,
        peers=tuple(peers),
    )
