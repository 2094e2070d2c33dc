"""The I/O edge: the only package that speaks to Redis. Connections, the wire format and error translation live
here; everything outside speaks fastworker's types and raises fastworker's errors.

- `errors`: redis-py's and the socket's errors translated into fastworker's; what an error reply means.
- `wire`: commands packed into RESP, replies parsed by hiredis (no I/O).
- `link`: one pooled connection held for pipelined exchanges (the publisher, the permission check).
- `admin`: the occasional commands of the operating tools, with plain values in and out.
- `streams`: the loops' connections (the hot path): reads, read-aheads, settle round trips, claims.
- `cluster`: routing by a cluster's slot map, one pool per master, redirections (MOVED, ASK, TRYAGAIN, CLUSTERDOWN)
  re-sent only when refused, lost replies never re-sent (the publisher's partitioned path).

Ruff's banned-api rule and tests/test_edge.py keep every other module off redis-py.
"""
