"""`python -m bench.peers --peer NAME [--n 200000] [--processes P] [--repeat R]`: one peer on a fresh embedded
server, its msgs/s per run and their median."""

from __future__ import annotations

import argparse
import logging
import sys

import redis

from bench.common import median, reset
from bench.peers import PEERS, PeerUnavailable
from bench.peers.server_limit import client_name
from fastworker.server import EmbeddedServer

STREAM, GROUP = "bench:peer", "bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--peer", required=True, choices=sorted(PEERS))
    parser.add_argument("--n", type=int, default=200_000, help="entries per run (default 200000)")
    parser.add_argument("--processes", type=int, default=1, help="consumer processes (default 1)")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the median is printed last (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with EmbeddedServer() as server:
        client = redis.Redis.from_url(server.url)
        note = f" via {client_name()}" if args.peer == "server_limit" else ""
        print(f"{args.peer}{note}, {server.version()}, n={args.n:,}, processes={args.processes}", flush=True)
        rates = []
        try:
            for _ in range(args.repeat):
                reset(client, STREAM, GROUP, args.n, create_group=not args.peer.startswith("taskiq"))
                rates.append(args.n / PEERS[args.peer](server.url, STREAM, GROUP, args.n, args.processes))
                print(f"  {rates[-1]:>10,.0f} msgs/s", flush=True)
        except PeerUnavailable as exc:
            print(f"{args.peer}: unavailable: {exc}", file=sys.stderr)
            return 2
        finally:
            client.close()
    print(f"median {median(rates):,.0f} msgs/s over {len(rates)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
