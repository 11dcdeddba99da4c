"""auditgate: an auditable AI-traffic gateway built as a bundle of mitmproxy addons.

Addon modules (one concern each, loadable alone with ``mitmdump -s addons/NAME.py``) import
mitmproxy; the plain modules they use (config loading, identities, secret scrubbing) do not,
so they can be tested directly. ``addons/gateway.py`` assembles the bundle in request order.
"""

