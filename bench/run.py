"""`make bench`: the fake upstream, the bare forwarder and llm-proxy (SQLite, PostgreSQL) side by side.

Everything listens on 127.0.0.1 and every load run is bounded in time. The forwarder and the proxy
are pinned to core 0, the fake upstream and the load generators (wrk, bench/stream_client.py, this
script) to core 1, so the figures are per core. Every server is started up front and stays up; the
non-streaming wrk figures are taken in interleaved rounds (each round runs every target at every
concurrency in turn), and each cell reports its best round, so a noisy neighbour slows all targets
alike instead of whichever one happened to be measured at the time. Streams, RSS, profiles and the
overhead sample follow, one target after the other. Run from the repo root:

    .venv/bin/python bench/run.py [--duration 4] [--rounds 3] [--streams 500] [--skip-pg]
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import profile_summary

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BIN = Path(sys.executable).parent  # gunicorn and flask live next to the python running this
CONCURRENCIES = (1, 16, 64)
MODEL = "gpt-4o-mini"
CHAT_PATH = "/v1/chat/completions"
# Limits high enough never to trigger, so the limit checks run on every request but never refuse.
KEY_RPM, KEY_TPM, KEY_BUDGET = 10_000_000, 1_000_000_000, 1_000_000
ADMIN_KEY = "sk-bench-admin-0123456789abcdef0123456789abcdef"
STATIC_KEY = "sk-bench-static-0123456789abcdef0123456789abcdef"
KEY_PATTERN = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}")
# Used for both stacks when the repo has no gunicorn.conf.py yet.
FALLBACK_GUNICORN = ["--worker-class", "gthread", "--threads", "32"]
PROXY_CORE, LOAD_CORE = 0, 1
PINNING = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds of wrk per cell and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved wrk rounds over every target; each cell reports its best round")
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams in the big stream run")
    parser.add_argument("--single-streams", type=int, default=10, help="sequential streams for TTFT at 1")
    parser.add_argument("--chunks", type=int, default=20, help="fake upstream: chunks per stream")
    parser.add_argument("--interval-ms", type=float, default=50, help="fake upstream: ms between chunks")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers for forwarder and proxy")
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL",
                                                           "postgresql://postgres@127.0.0.1:5432/bench"))
    parser.add_argument("--skip-pg", action="store_true", help="do not run the proxy on PostgreSQL")
    parser.add_argument("--no-pin-postgres", action="store_true",
                        help="leave a local PostgreSQL's processes on every core (by default they are moved to "
                             "the load core while the PostgreSQL-backed proxy is up, and back after it)")
    parser.add_argument("--skip-proxy", action="store_true", help="measure only upstream and forwarder")
    parser.add_argument("--soak", action="store_true",
                        help="also check worker RSS at 10,000 and 100,000 requests (adds ~3-6 min per database)")
    parser.add_argument("--json-out", help="also write every figure to this JSON file")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"),
                        help="py-spy binary: profile forwarder and proxy workers in an extra c16 run "
                             "(default: py-spy on PATH, if any)")
    return parser.parse_args(argv)


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(cmd: list[str], core: int) -> list[str]:
    """The command run under `taskset -c core` (unpinned on a one-core machine)."""
    return ["taskset", "-c", str(core), *cmd] if PINNING else cmd


class Processes:
    """The servers this script started, each in its own session so it can be stopped by its id."""

    def __init__(self, workdir: Path):
        """Remember where logs go."""
        self.workdir = workdir
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict, core: int) -> subprocess.Popen:
        """Start a pinned server with its output in workdir/name.log."""
        with open(self.workdir / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(pinned(cmd, core), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the server's process group, SIGKILL it after 10 s."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.running.remove(proc)

    def stop_all(self) -> None:
        """Stop whatever is still running."""
        for proc in list(self.running):
            self.stop(proc)


def request(method: str, url: str, body: dict | None = None, key: str = "", timeout: float = 10):
    """One HTTP request: (status, headers as a lower-case dict, body bytes)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                     json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until the server answers anything at url; fail if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            request("GET", url, timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no answer from {url} in {timeout:.0f} s")


def gunicorn_cmd(app_spec: str, port: int, workers: int) -> list[str]:
    """gunicorn with the repo's gunicorn.conf.py (one worker count, bound to loopback)."""
    conf = ["-c", "gunicorn.conf.py"] if (ROOT / "gunicorn.conf.py").exists() else FALLBACK_GUNICORN
    return [str(BIN / "gunicorn"), *conf, "--workers", str(workers), "--bind", f"127.0.0.1:{port}", app_spec]


def gunicorn_settings(workers: int, env: dict) -> str:
    """The resolved settings both stacks run with, as one line."""
    out = subprocess.run([*gunicorn_cmd("bench.bare_forwarder:app", 0, workers), "--print-config"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).stdout
    wanted = ("worker_class", "workers", "threads", "worker_connections", "keepalive", "backlog")
    found = dict(re.findall(r"^(\w+)\s+= (.*)$", out, re.M))
    source = "gunicorn.conf.py" if (ROOT / "gunicorn.conf.py").exists() else "bench fallback (no gunicorn.conf.py)"
    return ", ".join(f"{k}={found.get(k, '?')}" for k in wanted) + f"  [{source}, --workers {workers}]"


def wrk(url: str, concurrency: int, duration: int, key: str = "") -> dict:
    """Run wrk with bench/post.lua; requests/s and latency in ms, errors counted."""
    env = {**os.environ, "BENCH_KEY": key, "BENCH_MODEL": MODEL}
    cmd = pinned(["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s", "--latency",
                  "-s", str(BENCH / "post.lua"), url], LOAD_CORE)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 30).stdout
    found = re.search(r"^BENCH_JSON (.*)$", out, re.M)
    if not found:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    raw = json.loads(found.group(1))
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {"concurrency": concurrency, "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
            "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000, "errors": errors,
            "requests": raw["requests"], "raw": raw}


def streams(url: str, concurrency: int, total: int, key: str = "") -> dict:
    """Run bench/stream_client.py and return its JSON summary."""
    cmd = pinned([sys.executable, str(BENCH / "stream_client.py"), "--url", url, "-c", str(concurrency),
                  "-n", str(total), "--key", key, "--model", MODEL, "--timeout", "90", "--json"], LOAD_CORE)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"stream_client failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def children(master_pid: int) -> list[int]:
    """Process ids whose parent is the gunicorn master (its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master_pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(found)


def worker_peak_rss(master_pid: int) -> list[float]:
    """VmHWM in MiB of each worker of the gunicorn master."""
    peaks = []
    for pid in children(master_pid):
        try:
            found = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        except OSError:
            continue
        if found:
            peaks.append(round(int(found.group(1)) / 1024, 1))
    return peaks


def worker_rss(master_pid: int) -> float:
    """Current VmRSS in MiB of the gunicorn master's first worker."""
    status = Path(f"/proc/{children(master_pid)[0]}/status").read_text()
    return round(int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024, 1)


def soak(name: str, url: str, master_pid: int, key: str, limit_s: int = 600) -> dict:
    """wrk -c16 in 10 s slices; worker RSS once 10,000 and once 100,000 soak requests are served."""
    served, rss, started = 0, {}, time.monotonic()
    for mark in (10_000, 100_000):
        while served < mark and time.monotonic() - started < limit_s:
            served += wrk(url, 16, 10, key)["requests"]
        rss[mark] = worker_rss(master_pid)
        log(f"{name}: soak {served:,} requests, worker RSS {rss[mark]} MiB")
    growth = (rss[100_000] - rss[10_000]) / rss[10_000] * 100
    return {"served": served, "rss_10k_mib": rss[10_000], "rss_100k_mib": rss[100_000],
            "growth_pct": round(growth, 1), "seconds": round(time.monotonic() - started)}


def profile(name: str, master_pid: int, args, workdir: Path, what: str, load, seconds: float) -> str:
    """Record the first worker with py-spy (GIL-holding samples) for `seconds` while load() runs; summarise."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{name} {what}").strip("-")
    out = workdir / f"profile-{slug}.folded"
    spy = pinned([args.py_spy, "record", "--gil", "--nonblocking", "-r", "200", "-f", "raw", "-d",
                  str(max(1, round(seconds))), "-o", str(out), "-p", str(children(master_pid)[0])], LOAD_CORE)
    log(f"{name}: py-spy during {what}")
    recorder = subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # py-spy attaches before the load starts
    load()
    try:
        recorder.wait(30)
    except subprocess.TimeoutExpired:
        recorder.kill()
    if not out.exists():
        return f"{name}: py-spy wrote nothing (ptrace not permitted?)"
    return f"### {name}, {what} ({out})\n" + profile_summary.report(str(out), 20)


class CpuSampler:
    """The CPU time a process has used, sampled every 10 ms in a thread while entered.

    busy(start, seconds) is the share of one core the process used over that stretch: 100% means it
    was on CPU the whole time, i.e. it could not have done its work any sooner on that core.
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int):
        self.pid, self.samples, self._stop = pid, [], threading.Event()

    def _cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.TICK  # utime + stime

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.append((time.time(), self._cpu_seconds()))
            self._stop.wait(0.01)

    def __enter__(self) -> CpuSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def used(self, start: float, end: float) -> float:
        """CPU seconds used between two wall-clock times (nearest samples)."""
        def at(t: float) -> float:
            return min(self.samples, key=lambda sample: abs(sample[0] - t))[1]
        return at(end) - at(start) if self.samples else 0.0

    def busy(self, start: float, seconds: float) -> float:
        """Percent of one core used in the `seconds` after `start` (wall clock)."""
        return self.used(start, start + seconds) / seconds * 100 if seconds > 0 else 0.0


@dataclass
class Target:
    """One server under test: where it answers, the key to call it with, and its gunicorn master, if any."""

    name: str
    base: str
    key: str = ""
    master: int | None = None  # gunicorn master's pid: its workers' RSS and profile are recorded
    extra: dict = field(default_factory=dict)  # figures known once it is up (key kind, provider)

    @property
    def url(self) -> str:
        """The chat completions URL that wrk and the stream client call."""
        return self.base + CHAT_PATH

    @property
    def is_proxy(self) -> bool:
        """Whether this is llm-proxy (overhead sample, soak and /api/me apply)."""
        return self.name.startswith("llm-proxy")


def run_rounds(targets: list[Target], args) -> dict[str, list[list[dict]]]:
    """wrk at each concurrency for each target, round after round, so every target sees the same noise.

    Returns per target name its rounds, each a list of wrk results (one per concurrency).
    """
    for target in targets:
        log(f"{target.name}: warm-up")
        wrk(target.url, 16, 1, target.key)
    rounds = {target.name: [] for target in targets}
    for number in range(1, args.rounds + 1):
        for target in targets:
            cells = []
            for concurrency in CONCURRENCIES:
                log(f"round {number}/{args.rounds}, {target.name}: wrk -c{concurrency} -d{args.duration}s")
                cells.append({"round": number, **wrk(target.url, concurrency, args.duration, target.key)})
            rounds[target.name].append(cells)
    return rounds


def best_cells(rounds: list[list[dict]]) -> list[dict]:
    """Per concurrency, the round with the most req/s (noise only ever lowers throughput), with the spread."""
    best = []
    for cells in zip(*rounds, strict=True):
        top = max(cells, key=lambda w: w["rps"])
        rps = [w["rps"] for w in cells]
        best.append({**{k: v for k, v in top.items() if k != "raw"}, "rps_min": min(rps), "rps_max": max(rps),
                     "errors_all_rounds": sum(w["errors"] for w in cells)})
    return best


def measure_details(target: Target, args) -> dict:
    """The long figures, one target at a time: TTFT at 1 and at many, worker RSS, profile, proxy extras."""
    log(f"{target.name}: {args.single_streams} streams one at a time")
    result = {"stream1": streams(target.url, 1, args.single_streams, target.key)}
    log(f"{target.name}: {args.streams} concurrent streams")
    if not target.master:
        result["streamN"] = streams(target.url, args.streams, args.streams, target.key)
    else:
        with CpuSampler(children(target.master)[0]) as cpu:
            result["streamN"] = streams(target.url, args.streams, args.streams, target.key)
        run = result["streamN"]
        ttft, start = (run["ttft_p99_ms"] or 0) / 1000, run["started_at"]
        result["burst_cpu"] = {"busy_pct_until_ttft_p99": round(cpu.busy(start, ttft)),
                               "cpu_ms_per_stream": round(cpu.used(start, start + run["wall_s"])
                                                          / args.streams * 1000, 2)}
        result["rss_mib"] = worker_peak_rss(target.master)
        if args.py_spy:
            burst = args.interval_ms * (args.chunks + 1) / 1000 + 1.5
            result["profile"] = "\n\n".join([
                profile(target.name, target.master, args, args.workdir, f"wrk -c16 -d{args.duration}s",
                        lambda: wrk(target.url, 16, args.duration, target.key), args.duration - 1),
                profile(target.name, target.master, args, args.workdir, f"a burst of {args.streams} streams",
                        lambda: streams(target.url, args.streams, args.streams, target.key), burst)])
    if target.is_proxy:
        result.update(proxy_details(target, args))
    return result


def proxy_details(target: Target, args) -> dict:
    """200 sequential requests for x-llm-overhead-ms, the soak if asked for, and /api/me for the key."""
    log(f"{target.name}: 200 sequential requests for x-llm-overhead-ms")
    result = {"overhead": overhead_sample(target.base, target.key)}
    if args.soak:
        result["soak"] = soak(target.name, target.url, target.master, target.key)
    status, _, raw = request("GET", target.base + "/api/me", key=target.key)
    result["me"] = raw.decode(errors="replace")[:400] if status == 200 else f"GET /api/me: {status}"
    return result


def measure_all(targets: list[Target], args, notes: list[str]) -> list[dict]:
    """Interleaved wrk rounds over every target, then each target's long figures in turn."""
    rounds = run_rounds(targets, args)
    results = []
    for target in targets:
        result = {"name": target.name, **target.extra, "wrk": best_cells(rounds[target.name]),
                  "wrk_rounds": rounds[target.name]}
        try:
            result.update(measure_details(target, args))
        except (RuntimeError, OSError) as exc:
            notes.append(f"{target.name}: measuring streams/RSS/profile failed: {exc}")
        results.append(result)
    return results


def overhead_sample(base: str, key: str, count: int = 200) -> dict:
    """Sequential requests reading x-llm-overhead-ms; p50/p99 of the header and of the client's time."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    overheads, totals, statuses = [], [], {}
    for _ in range(count):
        start = time.perf_counter()
        conn.request("POST", CHAT_PATH, body, headers)
        resp = conn.getresponse()
        resp.read()
        totals.append((time.perf_counter() - start) * 1000)
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        if resp.getheader("x-llm-overhead-ms") is not None:
            overheads.append(float(resp.getheader("x-llm-overhead-ms")))
    conn.close()

    def pct(values, p):
        """Nearest-rank percentile of a list, or None."""
        return round(sorted(values)[max(0, int(len(values) * p / 100 + 0.999) - 1)], 2) if values else None

    return {"statuses": statuses, "overhead_p50_ms": pct(overheads, 50), "overhead_p99_ms": pct(overheads, 99),
            "client_p50_ms": pct(totals, 50), "client_p99_ms": pct(totals, 99)}


def create_key(env: dict, base: str) -> tuple[str, str]:
    """A virtual key with rpm/tpm/budget: the CLI, else POST /api/keys, else the static API_KEY."""
    cli = [str(BIN / "flask"), "--app", "app", "create-key", "--name", f"bench-{int(time.time())}",
           "--rpm", str(KEY_RPM), "--tpm", str(KEY_TPM), "--budget", str(KEY_BUDGET)]
    try:
        out = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        found = KEY_PATTERN.search(out.stdout)
        if out.returncode == 0 and found:
            return found.group(0), "virtual key from `flask --app app create-key`"
        log(f"create-key CLI unavailable (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-200:]}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"create-key CLI failed: {exc}")
    try:
        status, _, raw = request("POST", base + "/api/keys", {"name": "bench", "rpm_limit": KEY_RPM,
                                                              "tpm_limit": KEY_TPM, "max_budget": KEY_BUDGET},
                                 key=ADMIN_KEY)
        if status in (200, 201):
            return json.loads(raw)["key"], "virtual key from POST /api/keys"
        log(f"POST /api/keys answered {status}: {raw[:200]!r}")
    except (OSError, ValueError, KeyError) as exc:
        log(f"POST /api/keys failed: {exc}")
    return STATIC_KEY, "FALLBACK: static API_KEY (no virtual key: no rpm/tpm limits, no per-key cost)"


def ensure_pg_database(url: str) -> str | None:
    """Create the scratch database afresh (no tables from older schemas); None when ready, else why skipped."""
    try:
        import psycopg2
    except ImportError:
        return "psycopg2 is not installed"
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
        return f"database name {name!r} is not a plain identifier"
    try:
        conn = psycopg2.connect(urlunsplit(parts._replace(path="/postgres")), connect_timeout=5)
    except psycopg2.Error as exc:
        return f"PostgreSQL unreachable ({str(exc).strip().splitlines()[0]})"
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return None


def start_upstream(args, procs: Processes) -> Target:
    """The fake upstream, on the load core."""
    port = free_port()
    proc = procs.start("upstream", [sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(port),
                                    "--chunks", str(args.chunks), "--interval-ms", str(args.interval_ms)],
                       dict(os.environ), LOAD_CORE)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc)
    return Target("direct upstream", base)


def start_forwarder(env: dict, args, procs: Processes) -> Target:
    """The bare forwarder, under the same gunicorn settings as llm-proxy."""
    port = free_port()
    proc = procs.start("forwarder", gunicorn_cmd("bench.bare_forwarder:app", port, args.workers), env, PROXY_CORE)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/", proc)
    return Target("bare forwarder", base, master=proc.pid)


def start_proxy(label: str, database_url: str, upstream: str, args, procs: Processes) -> Target:
    """Start llm-proxy on one database, get a key, check one answer; stop it again if any of that fails."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "DATABASE_URL": database_url, "OPENAI_BASE_URL": upstream,
           "OPENAI_API_KEY": "sk-bench", "ADMIN_API_KEY": ADMIN_KEY, "API_KEY": STATIC_KEY,
           "CACHE_ENABLED": "false"}
    proc = procs.start(f"proxy-{label}", gunicorn_cmd("app:app", port, args.workers), env, PROXY_CORE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health", proc)
        key, how = create_key(env, base)
        status, headers, raw = request("POST", base + CHAT_PATH, {"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}]}, key=key)
        if status != 200:
            raise RuntimeError(f"proxy answered {status} to a plain request: {raw[:300]!r}")
    except Exception:
        procs.stop(proc)
        raise
    return Target(f"llm-proxy ({label})", base, key, proc.pid, {"key": how, "provider": headers.get("x-llm-provider")})


def pin_postgres(url: str, args) -> bool:
    """Whether to move PostgreSQL to the load core: pinning is on, not refused, and the database is local."""
    return PINNING and not args.no_pin_postgres and urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


def proxy_databases(args, notes: list[str]) -> list[tuple[str, str]]:
    """(label, DATABASE_URL) for each llm-proxy to run: SQLite, and PostgreSQL unless skipped or unreachable."""
    if args.skip_proxy:
        notes.append("llm-proxy skipped (--skip-proxy)")
        return []
    if not (ROOT / "app.py").exists():
        notes.append("llm-proxy skipped: no app.py in the repo yet")
        return []
    databases = [("SQLite", f"sqlite:///{args.workdir / 'bench.db'}")]
    if not args.skip_pg:
        why = ensure_pg_database(args.pg_url)
        databases += [("PostgreSQL", args.pg_url)] if why is None else []
        notes += [f"PostgreSQL skipped: {why}"] if why else []
    return databases


def start_proxies(upstream: str, args, procs: Processes, stack: contextlib.ExitStack,
                  notes: list[str]) -> list[Target]:
    """Every llm-proxy, up until the run ends; a local PostgreSQL is pinned (via stack) before its proxy starts."""
    targets = []
    for label, url in proxy_databases(args, notes):
        if label == "PostgreSQL" and pin_postgres(url, args):
            postgres = stack.enter_context(PostgresPinned(LOAD_CORE))
            notes += [postgres.note] if postgres.note else []
        try:
            targets.append(start_proxy(label, url, upstream, args, procs))
        except RuntimeError as exc:
            notes.append(f"llm-proxy ({label}) failed: {exc} (log: {args.workdir}/proxy-{label}.log)")
    return targets


def cell(value, digits: int = 1) -> str:
    """A table cell: a rounded number, or '-'."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def wrk_table(results: list[dict], rounds: int) -> list[str]:
    """The non-streaming table: each cell's best round, the spread over rounds, latency added to direct's."""
    direct = {w["concurrency"]: w for w in results[0]["wrk"]}
    lines = [f"## Non-streaming (wrk; best of {rounds} interleaved rounds by req/s, with that round's latency; "
             "spread = min-max req/s over the rounds; added = minus the direct upstream's best round at the same "
             "concurrency; errors = all rounds)", "",
             "| target | conc | req/s | spread req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        added = res is not results[0]
        for w in res["wrk"]:
            base = direct[w["concurrency"]]
            lines.append(f"| {res['name']} | {w['concurrency']} | {cell(w['rps'], 0)} "
                         f"| {cell(w['rps_min'], 0)}–{cell(w['rps_max'], 0)} | {cell(w['p50_ms'], 2)} "
                         f"| {cell(w['p99_ms'], 2)} | {cell(w['p50_ms'] - base['p50_ms'], 2) if added else '-'} "
                         f"| {cell(w['p99_ms'] - base['p99_ms'], 2) if added else '-'} | {w['errors_all_rounds']} |")
    return lines


def streams_table(results: list[dict], streams_n: str) -> list[str]:
    """The streaming table: TTFT at 1 and at N, failures, workers' peak RSS."""
    lines = ["## Streams (time to first chunk, ms; N concurrent streams)", "",
             "| target | TTFT p50 @1 | TTFT p99 @1 | TTFT p50 @N | TTFT p99 @N | added p99 @N | total p50 @N "
             "| failures @N | failures @1 | peak RSS/worker MiB | worker CPU until TTFT p99 @N "
             "| CPU ms/stream @N |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    floor = results[0].get("streamN", {}).get("ttft_p99_ms")
    for res in results:
        if "stream1" not in res or "streamN" not in res:
            continue
        one, many, burst = res["stream1"], res["streamN"], res.get("burst_cpu", {})
        added = many["ttft_p99_ms"] - floor if res is not results[0] and None not in (many["ttft_p99_ms"], floor) \
            else None
        fails = f"{many['failures']} {many['errors'] or ''}".strip()
        lines.append(f"| {res['name']} | {cell(one['ttft_p50_ms'])} | {cell(one['ttft_p99_ms'])} "
                     f"| {cell(many['ttft_p50_ms'])} | {cell(many['ttft_p99_ms'])} | {cell(added)} "
                     f"| {cell(many['total_p50_ms'])} | {fails} | {one['failures']} "
                     f"| {', '.join(map(str, res.get('rss_mib', []))) or '-'} "
                     f"| {cell(burst.get('busy_pct_until_ttft_p99'))}{'%' if burst else ''} "
                     f"| {cell(burst.get('cpu_ms_per_stream'), 2)} |")
    return lines + ["", f"N = {streams_n} concurrent streams; times in ms. Worker CPU until TTFT p99: the "
                    "share of its core the worker used from the burst's start until its p99 first chunk "
                    "(100% = it could not have answered sooner on that core); CPU ms/stream: the worker's "
                    "CPU over the whole burst (starts and every chunk relayed) per stream."]


def c64_ratio(res: dict, bare: dict | None) -> str:
    """The proxy's c64 req/s as a share of the bare forwarder's: best rounds, and round by round."""
    if not bare:
        return "c64 req/s: no bare forwarder to compare with"
    best = res["wrk"][-1]["rps"] / bare["wrk"][-1]["rps"] * 100
    per_round = [mine[-1]["rps"] / theirs[-1]["rps"] * 100
                 for mine, theirs in zip(res["wrk_rounds"], bare["wrk_rounds"], strict=True)]
    return (f"c64 req/s = {cell(best, 0)}% of the bare forwarder (best rounds; round by round "
            f"{', '.join(f'{r:.0f}%' for r in per_round)})")


def proxy_lines(results: list[dict]) -> list[str]:
    """One line per llm-proxy: key, provider, c64 ratio, overhead header, /api/me; the soak if run."""
    bare = next((r for r in results if r["name"] == "bare forwarder"), None)
    lines = []
    for res in results:
        if not res["name"].startswith("llm-proxy"):
            continue
        over, soaked = res.get("overhead", {}), res.get("soak")
        if soaked:
            lines.append(f"- {res['name']}: soak of {soaked['served']:,} requests in {soaked['seconds']} s: worker RSS "
                         f"{soaked['rss_10k_mib']} MiB at 10k, {soaked['rss_100k_mib']} MiB at 100k "
                         f"({soaked['growth_pct']:+.1f}%)")
        lines.append(f"- {res['name']}: {res['key']}; provider {res.get('provider')}; {c64_ratio(res, bare)}; "
                     f"x-llm-overhead-ms p50 {cell(over.get('overhead_p50_ms'), 2)} / p99 "
                     f"{cell(over.get('overhead_p99_ms'), 2)} (client p50 {cell(over.get('client_p50_ms'), 2)} ms, "
                     f"statuses {over.get('statuses')}); /api/me: {res.get('me')}")
    return lines


def report(results: list[dict], meta: dict, rounds: int) -> str:
    """The markdown tables and notes."""
    lines = [f"# llm-proxy benchmark, {meta['when']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "when"]
    lines += ["", *wrk_table(results, rounds), "", *streams_table(results, meta["streams"].split()[0]), ""]
    return "\n".join(lines + proxy_lines(results))


class PostgresPinned:
    """Move a local PostgreSQL's processes (and the backends they fork) to one core, and back after.

    The database's work is not the proxy's: left unpinned, the kernel often wakes a backend on the
    proxy's core (next to the proxy thread that woke it), and the proxy's one core then also runs
    PostgreSQL. Needs permission to change the processes' affinity (root, or the same user).
    """

    def __init__(self, core: int):
        """Nothing moved yet; note says what happened once entered."""
        self.core, self.saved, self.note = core, {}, None

    @staticmethod
    def pids() -> list[int]:
        """Process ids of every process named postgres."""
        found = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in found]

    def __enter__(self):
        """Pin every PostgreSQL process to the core, remembering each one's mask."""
        everyone = set(range(os.cpu_count() or 1))
        for pid in self.pids():
            try:
                self.saved[pid] = os.sched_getaffinity(pid)
                os.sched_setaffinity(pid, {self.core})
            except OSError as exc:
                self.note = f"PostgreSQL left unpinned ({exc.strerror})"
                break
        else:
            if self.saved:
                self.note = (f"PostgreSQL's {len(self.saved)} processes pinned to core {self.core} "
                             "while the PostgreSQL-backed proxy was up")
        self.everyone = everyone
        return self

    def __exit__(self, *exc_info):
        """Give every PostgreSQL process its mask back (newer ones the postmaster's, the lowest pid's)."""
        usual = min(self.saved.items())[1] if self.saved else self.everyone
        for pid in self.pids():
            try:
                os.sched_setaffinity(pid, self.saved.get(pid, usual))
            except OSError:
                pass


def prepare(args) -> None:
    """Check for wrk, raise the fd limit, pin this script to the load core, make the scratch directory."""
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install -y wrk")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))  # 500 streams need fds
    if PINNING:
        os.sched_setaffinity(0, {LOAD_CORE})
    else:
        log("fewer than 2 cores or no taskset: running unpinned")
    args.workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-bench-"))


def describe(args, settings: str) -> dict:
    """The report's meta lines: when, where, and how every figure was taken."""
    return {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores; " + ("forwarder/proxy on core 0, upstream + load on core 1"
                                                   if PINNING else "unpinned"),
        "gunicorn (forwarder and proxy)": settings,
        "wrk": f"-t1, {args.duration} s per cell, best of {args.rounds} interleaved rounds (every server up; a round "
               f"runs each target at c{', c'.join(map(str, CONCURRENCIES))} in turn), after a 1 s warm-up at c16 "
               "per target; POST of a small chat completion",
        "streams": f"{args.streams} at once, and {args.single_streams} one at a time; upstream "
                   f"{args.chunks} chunks x {args.interval_ms:g} ms, include_usage; one target after the other, "
                   "after the rounds",
        "model": f"{MODEL} (openai provider -> fake upstream)",
        "logs": str(args.workdir),
    }


def run_all(args, notes: list[str]) -> tuple[list[dict], str]:
    """Start every server, measure, stop them all (then unpin PostgreSQL); the results and gunicorn settings."""
    procs = Processes(args.workdir)
    with contextlib.ExitStack() as stack:  # holds PostgreSQL's pinning until every server is stopped
        try:
            upstream = start_upstream(args, procs)
            fwd_env = {**os.environ, "OPENAI_BASE_URL": upstream.base + "/v1", "OPENAI_API_KEY": "sk-bench"}
            settings = gunicorn_settings(args.workers, fwd_env)
            targets = [upstream, start_forwarder(fwd_env, args, procs),
                       *start_proxies(upstream.base + "/v1", args, procs, stack, notes)]
            results = measure_all(targets, args, notes)
        finally:
            procs.stop_all()
    return results, settings


def main() -> int:
    """Start everything, measure every target, print the report."""
    args = parse_args()
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    prepare(args)
    notes: list[str] = []
    started = time.monotonic()
    results, settings = run_all(args, notes)
    meta = describe(args, settings)
    text = report(results, meta, args.rounds)
    profiles = [r["profile"] for r in results if r.get("profile")]
    if profiles:
        text += "\n\n## Profiles (py-spy --gil: where the worker holds the GIL)\n\n" + "\n\n".join(profiles)
    if notes:
        text += "\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes)
    text += f"\n\nTotal run time: {time.monotonic() - started:.0f} s"
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "results": results, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
