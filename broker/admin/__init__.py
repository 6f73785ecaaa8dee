"""The operator's admin HTTP API (DESIGN §10): status, metrics, nodes, policy, queues, audit.

It runs on its own listener, never the node listener, and can neither read traffic (no endpoint
returns an envelope) nor widen sharing (policy comes only from documents the nations signed).
"""
