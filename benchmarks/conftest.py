"""pytest-benchmark setup: `python -m pytest benchmarks --benchmark-enable` runs these.

They are not collected by the test suite (testpaths = tests) and never decide a test."""
