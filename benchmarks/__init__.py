"""Benchmarks of the refiner: output quality on CommonGen (``benchmarks.quality``) and speed
(``benchmarks.speed``). Not part of the test suite; run them with ``make bench-quality`` /
``make bench-speed``. See ``benchmarks/README.md``.
"""
