"""Coverage-guided fuzzing of the parsers that read untrusted bytes (issue 8, item 2).

``targets`` holds one pure function per parser (bytes in; a documented :class:`BrokerError` is
swallowed, anything else propagates), ``seeds`` builds a small valid seed corpus, ``mutate``
has the helpers the targets and the hypothesis tests share, and ``run`` drives a target under
atheris/libFuzzer. See ``tests/fuzz/README.md``. Nothing here is collected by pytest; the
targets run without atheris in ``tests/unit/test_fuzz_targets.py``.
"""
