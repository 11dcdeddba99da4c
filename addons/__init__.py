"""auditgate: an auditable AI-traffic gateway built as a bundle of mitmproxy addons.

Addon modules (one concern each, loadable alone with ``mitmdump -s addons/NAME.py``) import
mitmproxy; the plain modules they use (config loading, identities, secret scrubbing) do not,
so they can be tested directly. ``addons/gateway.py`` assembles the bundle in request order.
"""

import logging as _logging

# Under mitmproxy every log record, whatever its level, is dispatched to every loaded addon: costly
# on the per-request path. Our per-request lines are debug lines; capping our loggers at INFO skips
# them before a record is made (lower the level here to see them). Presidio logs a debug line for
# every pattern it tries: those are cut at WARNING.
_logging.getLogger("addons").setLevel(_logging.INFO)
for _name in ("presidio-analyzer", "presidio-anonymizer", "tldextract", "filelock"):
    _logging.getLogger(_name).setLevel(_logging.WARNING)
