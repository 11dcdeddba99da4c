"""A first run without an OpenAI account (docs/first-run.md): a local OpenAI-compatible demo upstream
(``upstream``), the demo's rules, tokens and instructions (``setup``), ``auditgate demo`` itself, which
``./run_gateway.sh --demo`` runs (``run``), and the switch that turns on masking of person names with an
installed spaCy model, which ``./run_gateway.sh --ner`` runs (``ner``)."""

DEFAULT_DEMO_DIR = "records/demo"  # inside the git-ignored records/; made afresh at each demo start
