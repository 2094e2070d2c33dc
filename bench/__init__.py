"""Benchmarks of fastworker: end-to-end throughput and latency, peers side by side, hot-path micro-benchmarks."""
