"""The I/O edge: the only package that speaks to Redis. Connections, the wire format and error translation live
here; everything outside speaks fastworker's types and raises fastworker's errors.

- `errors`: redis-py's and the socket's errors translated into fastworker's; what an error reply means.
- `wire`: commands packed into RESP, replies parsed by hiredis (no I/O).
- `link`: one pooled connection held for pipelined exchanges (the publisher, the permission check).
- `admin`: the occasional commands of the operating tools, with plain values in and out.

`fastworker.streams` (the loops' connections) joins this package after its rework; ruff's banned-api rule and
tests/test_edge.py keep every other module off redis-py.
"""
