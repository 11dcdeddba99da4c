"""Tunnels (CONNECT to pass-through hosts, raw TCP after CONNECT): governed or refused. (Being built: issue 11.)"""

addons = []
