"""``coalition bench``: end-to-end measurements of a real broker, and of the limits it runs
against, in one run.

Every scenario that involves the broker starts a real ``coalition broker serve`` process on
``127.0.0.1:0`` with its own data directory (SQLite in WAL mode with ``synchronous=FULL``: the
audit log and the queues are durable) and drives it from separate load-generator processes
that speak the node protocol over raw WebSocket frames with envelopes built before the clock
starts. Modules:

- :mod:`broker.bench.harness`: the benchmark coalition, the broker process (RSS, CPU time);
- :mod:`broker.bench.context`: the options of a run and what the scenarios share;
- :mod:`broker.bench.workers`: publisher and subscriber processes (raw node-protocol frames);
- :mod:`broker.bench.load`: running a plan of workers against a server, and what it measured;
- :mod:`broker.bench.limits`: Ed25519 verify, unpack + verify + hash, aiohttp WebSocket echo;
- :mod:`broker.bench.throughput`, :mod:`~broker.bench.latency`, :mod:`~broker.bench.fanout`,
  :mod:`~broker.bench.policy`, :mod:`~broker.bench.auditor`, :mod:`~broker.bench.backlog`,
  :mod:`~broker.bench.peer` (with the MQTT client of :mod:`~broker.bench.mqtt`): the scenarios;
- :mod:`broker.bench.report` and :mod:`broker.bench.runner`: tables, ratios, the JSON document;
- :mod:`broker.bench.cli`: the ``bench`` subcommand.

Method and results: ``docs/performance.md``.
"""
