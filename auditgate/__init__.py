"""auditgate: an auditable AI-traffic gateway, as a bundle of mitmproxy addons.

One subpackage per capability; the mitmproxy face (hooks and options) is in the project's
``addons/`` folder, which delegates here:

- ``core``: OpenAI-shaped errors, credentials, the rules-file loader, request facts, the flow contract
- ``routing``: which upstreams are served (upstreams.yaml)
- ``identity``: service tokens, OIDC, group grants (identities.yaml)
- ``policy``: policy.yaml rules and decisions
- ``approval``: the approvals store, four-eyes rules, the admin API and page
- ``masking``: Presidio masking of bodies and streams, worker processes
- ``recording``: the flow-file writer
- ``audit``: the hash chain, signing keys, the offline verifier and the evidence pack
- ``cli``: the ``auditgate`` command
- ``demo``: a local OpenAI-compatible upstream for a first run without an account
"""
