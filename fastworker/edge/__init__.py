"""The I/O edge: the only package that speaks to Redis. Connections, the wire format and error translation live
here; everything outside speaks fastworker's types and raises fastworker's errors."""
