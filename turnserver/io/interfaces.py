"""This host's addresses, read from the kernel (rtnetlink RTM_GETADDR), standard library only.

The peer policy guards them: a wildcard listener receives on every address of the host, so a
peer on any of them and a listening port would be the server itself. Read at start-up and on
every reload; an error reading them leaves the list empty and the policy falls back to the
addresses named in the configuration (and all of 127.0.0.0/8, which it always guards).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

__all__ = ["host_addresses"]

_RTM_GETADDR = 22
_RTM_NEWADDR = 20
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")
# A dump of a host's addresses is a few KiB; a bound keeps a broken answer from looping on.
_MAX_REPLY_BYTES = 4 * 1024 * 1024


def _align(n: int) -> int:
    return (n + 3) & ~3


def _parse(data: bytes, out: set[str]) -> bool:
    """Add the addresses in one netlink reply to ``out``; False once the dump is done."""
    pos = 0
    while pos + _NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, pos)
        if length < _NLMSG_HDR.size or pos + length > len(data):
            return False
        if kind in (_NLMSG_DONE, _NLMSG_ERROR):
            return False
        if kind == _RTM_NEWADDR and length >= _NLMSG_HDR.size + _IFADDRMSG.size:
            family = data[pos + _NLMSG_HDR.size]
            at = pos + _NLMSG_HDR.size + _IFADDRMSG.size
            end = pos + length
            while at + _RTATTR.size <= end:
                attr_len, attr_type = _RTATTR.unpack_from(data, at)
                if attr_len < _RTATTR.size or at + attr_len > end:
                    break
                value = data[at + _RTATTR.size : at + attr_len]
                if attr_type in (_IFA_ADDRESS, _IFA_LOCAL):
                    if family == socket.AF_INET and len(value) == 4:
                        out.add(str(ipaddress.IPv4Address(value)))
                    elif family == socket.AF_INET6 and len(value) == 16:
                        out.add(str(ipaddress.IPv6Address(value)))
                at += _align(attr_len)
        pos += _align(length)
    return True


def host_addresses() -> list[str]:
    """Every IPv4 and IPv6 address configured on this host's interfaces, sorted; [] when the
    kernel cannot be asked (not Linux, or netlink refused)."""
    if not hasattr(socket, "AF_NETLINK"):
        return []
    found: set[str] = set()
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.settimeout(2.0)
            sock.bind((0, 0))
            request = _NLMSG_HDR.pack(_NLMSG_HDR.size + _IFADDRMSG.size, _RTM_GETADDR,
                                      _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
            request += _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            sock.send(request)
            received = 0
            while received < _MAX_REPLY_BYTES:
                data = sock.recv(65536)
                if not data:
                    break
                received += len(data)
                if not _parse(data, found):
                    break
    except OSError:
        return []
    return sorted(found)

