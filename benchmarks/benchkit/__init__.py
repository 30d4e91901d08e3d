"""Building blocks of ``benchmarks/bench_enrich.py`` (issue 10).

Every process that is measured runs on its own: the ApiOne sandbox (``python -m
apione_source.sandbox``), the connector (``pipelines/enrich.py`` through
:mod:`benchkit.run_connector`) and dlt's own fastest load (:mod:`benchkit.run_baseline`).
The harness only starts them, waits for them (``os.wait4``: wall time, CPU time and peak
RSS of each), and reads their DuckDB files afterwards.
"""
