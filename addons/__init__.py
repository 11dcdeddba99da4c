"""The mitmproxy face of auditgate: one module per concern, each a script ``mitmdump -s addons/NAME.py`` loads.

Not an installed package: mitmproxy loads these files by path, and ``addons/gateway.py`` loads its
siblings with ``auditgate.core.addon_files``. The logic they delegate to is the ``auditgate`` package.
"""
