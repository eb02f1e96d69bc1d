"""--allowed-node-hosts: the hosts the proxy may ever connect to as nodes (CIDRs and hostnames).

A URL's host is allowed when it is a listed hostname, an IP inside a listed network, or a hostname whose every
resolved address is inside a listed network (checked when the node is added; an empty list allows any host).
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class NodeHostPolicy:
    def __init__(self, entries: tuple[str, ...] = ()):
        self.networks, self.names = [], set()
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                self.names.add(entry.strip().lower().rstrip("."))
        self.enabled = bool(entries)

    def _in_networks(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.networks)

    def allows(self, url: str) -> bool:
        """Blocking (may resolve a hostname): call from a thread in async code."""
        if not self.enabled:
            return True
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        if not host:
            return False
        if host in self.names:
            return True
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            return self._in_networks(host)
        except ValueError:
            pass
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addresses) and all(self._in_networks(a) for a in addresses)
