"""Benchmarks: every hot path measured next to its raw floor, in the same run.

``python -m bench`` runs the full suite and writes ``bench/results.json``; ``python -m bench
--smoke`` runs tiny sizes (< 60 s) and writes to a temporary file or ``--out``. See
``bench/README.md`` for what each figure means. Targets are printed, never asserted.
"""
