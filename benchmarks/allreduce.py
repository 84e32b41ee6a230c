"""All-reduce latency of every collective path, 2 ranks on this machine.

    python benchmarks/allreduce.py [--ranks 2] [--budget 1.0]

Paths measured (float32 sum, sizes 4 KiB .. 4 MiB):

- torch.distributed gloo (ranks spawned like torchrun: env vars + gloo init);
- the shared-memory path (tp_engine.comm.shm) over the same gloo group, with
  the compiled helper and with the pure-Python fallback; built with
  max_bytes = the largest size so every size goes through shared memory;
- MPI through mpi4py (this script re-launches itself under ``mpirun``);
- torch.distributed's own ``mpi`` backend, where the torch build has it.

Each cell runs back-to-back all-reduces for about ``--budget`` seconds, split
over ``--rounds`` sweeps of all sizes; an iteration's latency is the slowest
rank's, and the table shows the median and 90th percentile of the sweep with
the lowest median (best of N: foreign load on a shared machine spoils a sweep,
not the result). Writes a markdown table to stdout and a log-log plot to
benchmarks/out/allreduce.png and docs/allreduce.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SIZES = [4 << 10, 16 << 10, 256 << 10, 4 << 20]
MIN_ITERS, MAX_ITERS = 20, 5000


def _fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def measure(comm, sizes: list[int], budget_s: float, rounds: int) -> dict[int, dict[str, float]]:
    """Median and p90 latency (us) per size; every rank must call it.

    Sweeps all sizes ``rounds`` times and keeps, per size, the round with the
    lowest median: on a shared machine a burst of foreign load then spoils
    one round, not the cell.
    """
    per_round = budget_s / rounds
    tensors, iters = {}, {}
    for nbytes in sizes:
        t = tensors[nbytes] = torch.zeros(nbytes // 4)  # zeros stay zeros: no inf/denormal slow paths
        for _ in range(5):
            comm.all_reduce_(t)
        start = time.perf_counter()
        for _ in range(10):
            comm.all_reduce_(t)
        per_iter = (time.perf_counter() - start) / 10
        # Rank 0 picks the iteration count; every rank must run the same number.
        n = torch.tensor([min(MAX_ITERS, max(MIN_ITERS, int(per_round / max(per_iter, 1e-7))))], dtype=torch.int64)
        comm.broadcast_(n, src=0)
        iters[nbytes] = int(n.item())
    best: dict[int, dict[str, float]] = {}
    clock = time.perf_counter
    for _ in range(rounds):
        for nbytes in sizes:
            t, times = tensors[nbytes], [0.0] * iters[nbytes]
            for i in range(len(times)):
                a = clock()
                comm.all_reduce_(t)
                times[i] = clock() - a
            times = torch.tensor(times, dtype=torch.float64)
            worst = comm.all_gather(times[None], dim=0).max(dim=0).values * 1e6  # slowest rank per iteration
            cell = {"median": float(worst.median()), "p90": float(worst.quantile(0.9)), "iters": len(times)}
            if nbytes not in best or cell["median"] < best[nbytes]["median"]:
                best[nbytes] = cell
    return best


# -- torch.distributed paths (gloo, shm over gloo) -------------------------------------


def _torch_worker(rank: int, world: int, port: int, sizes: list[int], budget_s: float, rounds: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    from tp_engine.comm.shm import ShmCommunicator
    from tp_engine.comm.torch_dist import TorchDistCommunicator

    dist.init_process_group("gloo")
    gloo = TorchDistCommunicator()
    results = {"torch gloo": measure(gloo, sizes, budget_s, rounds)}
    for label, native in (("shm (C helper)", None), ("shm (pure-Python fallback)", False)):
        comm = ShmCommunicator(gloo, max_bytes=max(sizes), native=native, close_fallback=False)
        if native is None and not comm.native:
            label = "shm (C helper unavailable: pure Python)"
        results[label] = measure(comm, sizes, budget_s, rounds)
        comm.close()
    if rank == 0:
        queue.put(results)
    gloo.barrier()
    gloo.close()


def run_torch_paths(world: int, sizes: list[int], budget_s: float, rounds: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_torch_worker, args=(r, world, port, sizes, budget_s, rounds, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = queue.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return results


# -- MPI paths (this script under mpirun) ----------------------------------------------


def _mpi_worker(out_json: str, sizes: list[int], budget_s: float, rounds: int) -> None:
    torch.set_num_threads(1)
    from tp_engine.comm.mpi import MPICommunicator

    comm = MPICommunicator()
    results = {"MPI (mpi4py, Open MPI)": measure(comm, sizes, budget_s, rounds)}
    import torch.distributed as dist

    if dist.is_mpi_available():
        from tp_engine.comm.torch_dist import TorchDistCommunicator

        dist.init_process_group("mpi")
        results["torch mpi backend"] = measure(TorchDistCommunicator(), sizes, budget_s, rounds)
    else:
        results["torch mpi backend"] = None
    if comm.rank == 0:
        Path(out_json).write_text(json.dumps(results))
    comm.barrier()


def run_mpi_paths(world: int, sizes: list[int], budget_s: float, rounds: int) -> dict:
    mpirun = shutil.which("mpirun", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return {"MPI (mpi4py)": "unavailable: mpi4py not installed"}
    if mpirun is None:
        return {"MPI (mpi4py)": "unavailable: no mpirun"}
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    cmd = [mpirun, "-n", str(world)]
    if "Open MPI" in version:
        cmd += ["--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader"]
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "mpi.json")
        cmd += [sys.executable, str(Path(__file__).resolve()), "--mpi-worker", out_json,
                "--budget", str(budget_s), "--rounds", str(rounds), "--sizes", ",".join(map(str, sizes))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if proc.returncode != 0 or not os.path.exists(out_json):
            return {"MPI (mpi4py)": f"failed: {proc.stderr.strip()[-300:]}"}
        results = json.loads(Path(out_json).read_text())
    if results.get("torch mpi backend") is None:
        results["torch mpi backend"] = "unavailable (torch built without MPI)"
    return {k: ({int(s): v for s, v in r.items()} if isinstance(r, dict) else r) for k, r in results.items()}


# -- across simulated hosts (tp_engine.launch.simhosts; root only) ------------------------

CROSS_PORT = 29611  # inside fresh network namespaces: nothing else listens there


def _cross_worker(out_json: str, backend: str, sizes: list[int], budget_s: float, rounds: int) -> None:
    """One rank of a cross-host run (started on its simulated host with torchrun's variables)."""
    torch.set_num_threads(1)
    import tp_engine

    rt = tp_engine.init(backend=None if backend == "auto" else backend)
    cells = measure(rt.comm, sizes, budget_s, rounds)
    if rt.rank == 0:
        Path(out_json).write_text(json.dumps({"name": rt.comm.name, "cells": cells}))
    rt.comm.barrier()
    tp_engine.shutdown()


def _pingpong_server(port: int) -> None:
    """Echo length-prefixed messages until a zero length arrives."""
    srv = socket.create_server(("0.0.0.0", port))
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(max(SIZES) + 8)
    view = memoryview(buf)
    while True:
        n = int.from_bytes(_recv_exact(conn, view[:8]), "little")
        if n == 0:
            break
        _recv_exact(conn, view[:n])
        conn.sendall(view[:n])
    conn.close()
    srv.close()


def _recv_exact(conn: socket.socket, view: memoryview) -> memoryview:
    got = 0
    while got < view.nbytes:
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n
    return view


def _pingpong_client(addr: str, port: int, out_json: str, sizes: list[int], budget_s: float, rounds: int) -> None:
    """Round trips of ``size`` bytes each way (Python sockets, TCP_NODELAY): the floor for a 2-host all-reduce."""
    for _ in range(100):
        try:
            conn = socket.create_connection((addr, port))
            break
        except OSError:
            time.sleep(0.1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = memoryview(bytearray(max(sizes)))
    best: dict[int, dict[str, float]] = {}
    for _ in range(rounds):
        for n in sizes:
            payload = n.to_bytes(8, "little") + bytes(n)
            times = []
            end = time.perf_counter() + budget_s / rounds
            while (len(times) < MIN_ITERS or time.perf_counter() < end) and len(times) < MAX_ITERS:
                a = time.perf_counter()
                conn.sendall(payload)
                _recv_exact(conn, back[:n])
                times.append(time.perf_counter() - a)
            t = torch.tensor(times[5:], dtype=torch.float64) * 1e6
            cell = {"median": float(t.median()), "p90": float(t.quantile(0.9)), "iters": len(times) - 5}
            if n not in best or cell["median"] < best[n]["median"]:
                best[n] = cell
    conn.sendall((0).to_bytes(8, "little"))
    conn.close()
    Path(out_json).write_text(json.dumps(best))


def run_cross_host(sizes: list[int], budget_s: float, rounds: int, backends: list[str]) -> dict:
    """Rows across 2 simulated hosts: the TCP round trip, then 2 x 1 and 2 x 2 ranks per backend."""
    try:
        from tp_engine.launch.simhosts import SimHosts, unavailable
    except ImportError:
        return {"across hosts": "unavailable: no tp_engine.launch.simhosts"}
    reason = unavailable()
    if reason is not None:
        return {"across hosts": f"unavailable: {reason}"}
    me = str(Path(__file__).resolve())
    common = ["--budget", str(budget_s), "--rounds", str(rounds), "--sizes", ",".join(map(str, sizes))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TP_ENGINE_HOST_ID"):
        env.pop(var, None)
    results: dict = {}
    with SimHosts(2) as hosts, tempfile.TemporaryDirectory() as tmp:
        master = hosts.hosts[0].address
        out = os.path.join(tmp, "pingpong.json")
        server = hosts.popen(1, [sys.executable, me, "--pingpong-server", str(CROSS_PORT)], env=env)
        client = hosts.run(0, [sys.executable, me, "--pingpong-client", hosts.hosts[1].address, str(CROSS_PORT), out] + common,
                           env=env, timeout=600)
        server.wait(timeout=60)
        results["TCP round trip, 2 hosts (Python ping-pong, size each way)"] = (
            {int(k): v for k, v in json.loads(Path(out).read_text()).items()} if client.returncode == 0
            else f"failed: {client.stderr.strip()[-300:]}"
        )
        for per_host in (1, 2):
            world = 2 * per_host
            for backend in backends:
                out = os.path.join(tmp, f"{per_host}-{backend}.json")
                procs = []
                for rank in range(world):
                    h, local = divmod(rank, per_host)
                    rank_env = dict(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local),
                                    MASTER_ADDR=master, MASTER_PORT=str(CROSS_PORT + 1))
                    argv = [sys.executable, me, "--cross-worker", out, "--backend", backend] + common
                    procs.append(hosts.popen(h, argv, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                logs = [p.communicate(timeout=600)[0] for p in procs]
                if all(p.returncode == 0 for p in procs) and os.path.exists(out):
                    data = json.loads(Path(out).read_text())
                    results[f"2 hosts × {per_host} rank{'s' if per_host > 1 else ''}: {data['name']}"] = {
                        int(k): v for k, v in data["cells"].items()}
                else:
                    results[f"2 hosts × {per_host}: {backend}"] = f"failed: {logs[0].strip()[-300:]}"
    return results


def cross_host_summary(results: dict, sizes: list[int]) -> list[str]:
    """The issue's targets, checked against the measured medians."""
    rtt = results.get("TCP round trip, 2 hosts (Python ping-pong, size each way)")
    one = next((v for k, v in results.items() if k.startswith("2 hosts × 1 rank:") and "gloo" not in k), None)
    two = next((v for k, v in results.items() if k.startswith("2 hosts × 2 ranks:") and "gloo" not in k), None)
    lines = []
    if isinstance(rtt, dict) and isinstance(one, dict) and 4096 in sizes:
        ratio = one[4096]["median"] / rtt[4096]["median"]
        lines.append(f"4 KiB, 2 hosts × 1: {ratio:.2f}× the TCP round trip (target ≤ 2×)")
    if isinstance(one, dict) and isinstance(two, dict):
        ratios = ", ".join(f"{_fmt_size(s)} {two[s]['median'] / one[s]['median']:.2f}×" for s in sizes)
        lines.append(f"2 × 2 over 2 × 1: {ratios} (target ≤ 1.5×)")
    return lines


# -- report ---------------------------------------------------------------------------


def table(results: dict, sizes: list[int]) -> str:
    head = "| path | " + " | ".join(f"{_fmt_size(s)} median / p90 (µs)" for s in sizes) + " |"
    lines = [head, "|" + " --- |" * (len(sizes) + 1)]
    for path, cells in results.items():
        if isinstance(cells, str):
            lines.append(f"| {path} | " + " | ".join([cells] + [""] * (len(sizes) - 1)) + " |")
            continue
        row = [f"{cells[s]['median']:,.1f} / {cells[s]['p90']:,.1f}" for s in sizes]
        lines.append(f"| {path} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict, sizes: list[int], paths: list[Path], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cells in results.items():
        if isinstance(cells, str):
            continue
        med = [cells[s]["median"] for s in sizes]
        p90 = [cells[s]["p90"] for s in sizes]
        line, = ax.plot(sizes, med, marker="o", label=name)
        ax.fill_between(sizes, med, p90, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [_fmt_size(s) for s in sizes])
    ax.set_xlabel("all-reduce size (float32)")
    ax.set_ylabel("latency, µs (median; band up to p90)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
    plt.close(fig)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per path and size")
    ap.add_argument("--rounds", type=int, default=3, help="sweeps over the sizes; the best is kept")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="bytes, comma separated")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--cross-host", action="store_true",
                    help="only the rows across 2 simulated hosts (root; tp_engine.launch.simhosts)")
    ap.add_argument("--cross-backends", default="auto,gloo", help="backends for the cross-host rows")
    ap.add_argument("--mpi-worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--cross-worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--pingpong-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--pingpong-client", nargs=3, metavar=("ADDR", "PORT", "OUT_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.mpi_worker:
        _mpi_worker(args.mpi_worker, sizes, args.budget, args.rounds)
        return
    if args.cross_worker:
        _cross_worker(args.cross_worker, args.backend, sizes, args.budget, args.rounds)
        return
    if args.pingpong_server:
        _pingpong_server(args.pingpong_server)
        return
    if args.pingpong_client:
        addr, port, out = args.pingpong_client
        _pingpong_client(addr, int(port), out, sizes, args.budget, args.rounds)
        return
    if args.cross_host:
        start = time.perf_counter()
        results = run_cross_host(sizes, args.budget, args.rounds, args.cross_backends.split(","))
        title = (f"all-reduce across 2 simulated hosts (network namespaces on a bridge), {_cpu_name()} "
                 f"({os.cpu_count()} cores), torch {torch.__version__}, {datetime.date.today()}")
        print(f"# {title}\n")
        print(table(results, sizes))
        print("\n" + "\n".join(cross_host_summary(results, sizes)))
        if not args.no_plot:
            outs = [ROOT / "benchmarks" / "out" / "allreduce_cross_host.png", ROOT / "docs" / "allreduce_cross_host.png"]
            plot(results, sizes, outs, title)
            print("plot: " + ", ".join(str(p.relative_to(ROOT)) for p in outs))
        print(f"({time.perf_counter() - start:.0f} s)")
        return

    start = time.perf_counter()
    results = run_torch_paths(args.ranks, sizes, args.budget, args.rounds)
    results.update(run_mpi_paths(args.ranks, sizes, args.budget, args.rounds))
    order = ["torch gloo", "torch mpi backend"]
    results = {k: results[k] for k in order if k in results} | {k: v for k, v in results.items() if k not in order}

    title = (
        f"all-reduce, {args.ranks} ranks, {_cpu_name()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, {datetime.date.today()}"
    )
    print(f"# {title}\n")
    print(table(results, sizes))
    print(f"\nbest of {args.rounds} sweeps per cell, ~{args.budget:g} s per cell; latency = slowest rank per iteration.")
    print(
        f"shm rows: ShmCommunicator(max_bytes={_fmt_size(max(sizes))}) so every size uses shared memory "
        "(the default max_bytes sends larger tensors to gloo)."
    )
    if not args.no_plot:
        outs = [ROOT / "benchmarks" / "out" / "allreduce.png", ROOT / "docs" / "allreduce.png"]
        plot(results, sizes, outs, title)
        print("plot: " + ", ".join(str(p.relative_to(ROOT)) for p in outs))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
