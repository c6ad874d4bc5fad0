# Tools for developing pulsebridge, apart from what a hub runs: simulated
# boards, the demo, benchmarks, a local backend and a test CA. Their
# dependencies are the `dev` extra (pip install -e '.[dev]'); nothing outside
# agent/dev imports them.
