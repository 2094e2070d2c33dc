"""Operating tools: inspection (status, health, gauges), dead letters, replay, safe trimming, dead consumers.

Library functions over a `Streams` connection; the `fastworker` subcommands and the fleet's periodic jobs call
them. Reading functions never write; every writing function says in its docstring what it changes.
"""
