"""Host topology from faked sysfs trees, the one-rank-per-domain planner (examples and properties), pinning."""
from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tp_engine.launch.topology import (
    CPUS_ENV,
    THREADS_ENV,
    Topology,
    format_cpulist,
    local_rank_from_env,
    parse_cpulist,
    pin_rank,
    plan_ranks,
    read_topology,
)

# ---------------------------------------------------------------- fake hosts


def box(nodes: int, l3_per_node: int, cores_per_l3: int, smt: int = 1, adjacent: bool = False) -> dict:
    """A host's layout. Siblings numbered the Linux x86 way (core c: c, c + cores, ...) or next to each other."""
    n_cores = nodes * l3_per_node * cores_per_l3
    cores = [[c * smt + t for t in range(smt)] if adjacent else [c + t * n_cores for t in range(smt)] for c in range(n_cores)]
    l3 = [sum(cores[i * cores_per_l3:(i + 1) * cores_per_l3], []) for i in range(nodes * l3_per_node)]
    numa = [sum(l3[i * l3_per_node:(i + 1) * l3_per_node], []) for i in range(nodes)]
    return dict(cores=[sorted(c) for c in cores], l3=[sorted(g) for g in l3], numa=[sorted(g) for g in numa])


def write_sysfs(root, layout: dict, numa: bool = True, caches: bool = True, siblings: bool = True,
                l3_size: str = "32768K") -> str:
    def put(path, text):
        path = os.path.join(str(root), path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")

    cpus = sorted(c for g in layout["numa"] for c in g)
    put("devices/system/cpu/online", format_cpulist(cpus))
    for cpu in cpus:
        base = f"devices/system/cpu/cpu{cpu}"
        os.makedirs(os.path.join(str(root), base), exist_ok=True)
        if siblings:
            core = next(c for c in layout["cores"] if cpu in c)
            put(f"{base}/topology/thread_siblings_list", format_cpulist(core))
        if caches:
            # L1 and L3 only (index2, the L2, left out: fewer files to write); the reader must skip the L1.
            for i, (level, kind, shared, size) in ((0, (1, "Data", [cpu], "48K")),
                                                   (3, (3, "Unified", next(g for g in layout["l3"] if cpu in g), l3_size))):
                put(f"{base}/cache/index{i}/level", str(level))
                put(f"{base}/cache/index{i}/type", kind)
                put(f"{base}/cache/index{i}/shared_cpu_list", format_cpulist(shared))
                put(f"{base}/cache/index{i}/size", size)
    if numa:
        for i, node in enumerate(layout["numa"]):
            put(f"devices/system/node/node{i}/cpulist", format_cpulist(node))
        put(f"devices/system/node/node{len(layout['numa'])}/cpulist", "")  # a memory-only node (CXL): no CPUs
    return str(root)


def expected(layout: dict, allowed) -> Topology:
    allowed = set(allowed)

    def clip(groups):
        return tuple(t for t in (tuple(sorted(set(g) & allowed)) for g in groups) if t)

    return Topology(tuple(sorted(allowed)), clip(layout["numa"]), clip(layout["l3"]),
                    (32 * 2**20,) * len(clip(layout["l3"])), tuple(sorted(clip(layout["cores"]))))


EPYC = box(nodes=2, l3_per_node=4, cores_per_l3=8, smt=2)  # 2 sockets x 4 CCDs x 8 cores, SMT: 128 CPUs
EPYC_CPUS = range(128)


def ccd(i: int) -> set[int]:
    return set(range(8 * i, 8 * i + 8)) | set(range(64 + 8 * i, 64 + 8 * i + 8))


# ---------------------------------------------------------------- cpulists


def test_cpulist_syntax():
    assert parse_cpulist("0-3,8-11") == [0, 1, 2, 3, 8, 9, 10, 11]
    assert parse_cpulist(" 5 ") == [5] and parse_cpulist("") == [] and parse_cpulist("\n") == []
    assert parse_cpulist("0-7:2") == [0, 2, 4, 6]
    assert parse_cpulist("64-65,0-1") == [64, 65, 0, 1]  # the written order is kept
    assert format_cpulist([0, 1, 2, 3, 64, 65, 5]) == "0-3,64-65,5"
    assert format_cpulist([]) == ""
    for bad in ("a", "3-1", "1,,2", "0-3,2", "1-", "0-4:0"):
        with pytest.raises(ValueError, match="bad cpulist"):
            parse_cpulist(bad)


@given(st.lists(st.integers(0, 300), unique=True, max_size=40))
def test_cpulist_round_trip(cpus):
    assert parse_cpulist(format_cpulist(cpus)) == cpus


# ---------------------------------------------------------------- reading sysfs


def test_two_socket_epyc(tmp_path):
    topo = read_topology(write_sysfs(tmp_path, EPYC), allowed=EPYC_CPUS)
    assert topo == expected(EPYC, EPYC_CPUS) and topo.reason == ""
    assert topo.numa == (tuple(range(32)) + tuple(range(64, 96)), tuple(range(32, 64)) + tuple(range(96, 128)))
    assert [set(g) for g in topo.l3] == [ccd(i) for i in range(8)]
    assert topo.cores[0] == (0, 64) and len(topo.cores) == 64
    assert "128 CPUs (0-127), 64 cores x 2 SMT, 2 NUMA node(s), 8 L3 domain(s), L3 32 MiB" in topo.describe()

    auto = plan_ranks(topo)  # one rank per socket, one thread per physical core
    assert [(p.cpulist(), p.threads) for p in auto] == [("0-31,64-95", 32), ("32-63,96-127", 32)]
    assert auto[1].env() == {CPUS_ENV: "32-63,96-127", THREADS_ENV: "32", "OMP_NUM_THREADS": "32"}
    l3 = plan_ranks(topo, prefer="l3")  # one per CCD
    assert [set(p.cpus) for p in l3] == [ccd(i) for i in range(8)] and {p.threads for p in l3} == {8}
    assert [set(p.cpus) for p in plan_ranks(topo, 4)] == [ccd(0) | ccd(1), ccd(2) | ccd(3), ccd(4) | ccd(5), ccd(6) | ccd(7)]
    assert [set(p.cpus) for p in plan_ranks(topo, 8)] == [ccd(i) for i in range(8)]  # cut along the CCDs
    sixteen = plan_ranks(topo, 16)
    assert sixteen[0].cpus == (0, 1, 2, 3, 64, 65, 66, 67) and {p.threads for p in sixteen} == {4}
    assert [p.threads for p in plan_ranks(topo, 2, threads=48)] == [48, 48]  # SMT siblings on request


def test_refusals(tmp_path):
    topo = read_topology(write_sysfs(tmp_path, EPYC), allowed=EPYC_CPUS)
    with pytest.raises(ValueError, match="3 ranks do not split evenly over 2 NUMA domains"):
        plan_ranks(topo, 3)
    with pytest.raises(ValueError, match="3 ranks do not split evenly over 8 L3 domains"):
        plan_ranks(topo, 3, prefer="l3")
    with pytest.raises(ValueError, match="129 ranks but this host lets this process use 128 CPUs"):
        plan_ranks(topo, 129)
    with pytest.raises(ValueError, match="65 threads per rank, but rank 0 has 64 CPUs"):
        plan_ranks(topo, 2, threads=65)
    for ranks in (0, -1, "two", True, 1.5):
        with pytest.raises(ValueError, match="ranks per host must be 'auto' or a positive integer"):
            plan_ranks(topo, ranks)
    with pytest.raises(ValueError, match="threads per rank must be a positive integer"):
        plan_ranks(topo, 2, threads=0)
    with pytest.raises(ValueError, match="prefer must be one of numa, l3"):
        plan_ranks(topo, prefer="ccd")


def test_one_node_sixteen_cores(tmp_path):
    layout = box(nodes=1, l3_per_node=1, cores_per_l3=16)
    topo = read_topology(write_sysfs(tmp_path, layout), allowed=range(16))
    assert topo == expected(layout, range(16))
    assert [(p.cpulist(), p.threads) for p in plan_ranks(topo)] == [("0-15", 16)]
    assert [p.cpulist() for p in plan_ranks(topo, 2)] == ["0-7", "8-15"]
    assert [p.cpulist() for p in plan_ranks(topo, 3)] == ["0-5", "6-10", "11-15"]  # one core apart at most
    assert plan_ranks(topo, prefer="l3") == plan_ranks(topo)


def test_adjacent_siblings_are_ordered_core_first(tmp_path):
    layout = box(nodes=1, l3_per_node=2, cores_per_l3=4, smt=2, adjacent=True)  # a desktop with 2 CCDs
    topo = read_topology(write_sysfs(tmp_path, layout), allowed=range(16))
    (one,) = plan_ranks(topo)
    assert one.cpus[:8] == (0, 2, 4, 6, 8, 10, 12, 14) and one.threads == 8  # worker i on core i
    assert [p.cpulist() for p in plan_ranks(topo, 2)] == ["0,2,4,6,1,3,5,7", "8,10,12,14,9,11,13,15"]


def test_apple_like_box_without_numa_or_cache_files(tmp_path):
    layout = box(nodes=1, l3_per_node=1, cores_per_l3=10)
    topo = read_topology(write_sysfs(tmp_path, layout, numa=False, caches=False, siblings=False), allowed=range(10))
    assert topo.numa == topo.l3 == (tuple(range(10)),) and topo.l3_bytes == (None,)
    assert "no NUMA nodes" in topo.reason and "SMT siblings unknown" in topo.reason
    assert [p.threads for p in plan_ranks(topo)] == [10]
    # No sysfs at all (macOS): the allowed CPUs, one domain.
    bare = read_topology(str(tmp_path / "nothing"), allowed={0, 1, 2, 3})
    assert bare.cpus == (0, 1, 2, 3) and bare.numa == ((0, 1, 2, 3),) and "no CPU list" in bare.reason
    assert plan_ranks(bare, 2)[1].cpus == (2, 3)


def test_container_with_a_subset_mask(tmp_path):
    root = write_sysfs(tmp_path, EPYC)
    allowed = set(range(4, 12)) | set(range(68, 76))  # half of CCD 0 and half of CCD 1, on socket 0
    topo = read_topology(root, allowed=allowed)
    assert topo == expected(EPYC, allowed) and topo.cpus == tuple(sorted(allowed))
    (one,) = plan_ranks(topo)
    assert set(one.cpus) == allowed and one.threads == 8
    assert [p.cpulist() for p in plan_ranks(topo, prefer="l3")] == ["4-7,68-71", "8-11,72-75"]
    # Across both sockets: a rank per socket, each inside it.
    straddle = read_topology(root, allowed=range(28, 36))
    assert [p.cpulist() for p in plan_ranks(straddle)] == ["28-31", "32-35"]
    with pytest.raises(ValueError, match="no usable CPU"):
        read_topology(root, allowed={500})


def test_the_real_host_reads():
    topo = read_topology()
    assert set(topo.cpus) <= set(os.sched_getaffinity(0))
    assert plan_ranks(topo, 1)[0].threads == topo.physical_cores(topo.cpus)


# ---------------------------------------------------------------- pinning


def test_pin_rank_plans_or_takes_the_launchers_list(tmp_path):
    root = write_sysfs(tmp_path, EPYC)
    calls = []

    def pin(ranks="auto", **kw):
        env = kw.pop("environ")
        return pin_rank(kw.pop("local_rank", 1), ranks, root=root, allowed=EPYC_CPUS, environ=env,
                        setaffinity=lambda pid, cpus: calls.append((pid, set(cpus))), **kw)

    env: dict[str, str] = {}
    assert pin(environ=env) == 32  # rank 1 of one per socket
    assert calls[-1] == (0, set(range(32, 64)) | set(range(96, 128)))
    assert env == {CPUS_ENV: "32-63,96-127", THREADS_ENV: "32", "OMP_NUM_THREADS": "32"}
    env = {CPUS_ENV: "0-3,64-67", THREADS_ENV: "2"}
    assert pin(ranks=7, environ=env) == 2 and calls[-1] == (0, {0, 1, 2, 3, 64, 65, 66, 67})
    env = {CPUS_ENV: "0-3,64-67"}
    assert pin(environ=env) == 4 and env["OMP_NUM_THREADS"] == "4"  # one per physical core
    with pytest.raises(ValueError, match="names CPUs this process may not use: 128-129"):
        pin(environ={CPUS_ENV: "126-129"})
    with pytest.raises(ValueError, match="9 threads do not fit"):
        pin(environ={CPUS_ENV: "0-7", THREADS_ENV: "9"})
    with pytest.raises(ValueError, match="local rank 2 is not one of the 2 ranks"):
        pin(local_rank=2, environ={})


def test_local_rank_from_launchers():
    assert local_rank_from_env({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}) == (1, 4)
    assert local_rank_from_env({"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == (0, 2)
    assert local_rank_from_env({"MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "8"}) == (3, 8)
    assert local_rank_from_env({"LOCAL_RANK": "0"}) is None


# ---------------------------------------------------------------- properties


@st.composite
def hosts(draw):
    layout = box(draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 2)),
                 draw(st.booleans()))
    cpus = sorted(c for g in layout["numa"] for c in g)
    allowed = cpus if draw(st.booleans()) else draw(st.lists(st.sampled_from(cpus), min_size=1, unique=True))
    return layout, allowed


@settings(max_examples=15, deadline=None)
@given(hosts())
def test_sysfs_is_read_back(host):
    layout, allowed = host
    with tempfile.TemporaryDirectory() as root:
        assert read_topology(write_sysfs(root, layout), allowed=allowed) == expected(layout, allowed)


@settings(max_examples=300, deadline=None)
@given(hosts(), st.integers(1, 40), st.sampled_from(["numa", "l3"]), st.none() | st.integers(1, 6))
def test_every_cpu_once_and_ranks_inside_their_domains(host, ranks, prefer, threads):
    topo = expected(*host)
    domains = [set(d) for d in topo.domains(prefer)]
    d = len(domains)
    fits = (ranks <= d and d % ranks == 0) or (ranks % d == 0 and min(map(len, domains)) >= ranks // d)
    try:
        plan = plan_ranks(topo, ranks, None, prefer)
    except ValueError:
        assert not fits
        return
    assert len(plan) == ranks and [p.local_rank for p in plan] == list(range(ranks))
    used = [c for p in plan for c in p.cpus]
    assert sorted(used) == list(topo.cpus)  # every allowed CPU, each once
    for p in plan:
        mine = set(p.cpus)
        assert p.threads == topo.physical_cores(mine) >= 1
        if ranks >= d:
            assert sum(1 for dom in domains if dom & mine) == 1  # inside one domain
        if d % ranks == 0:
            assert all(dom <= mine for dom in domains if dom & mine)  # whole domains
        # core-first order: no core's second CPU before every core's first
        firsts = {min(c for c in core if c in mine) for core in topo.cores if mine & set(core)}
        assert set(p.cpus[:len(firsts)]) == firsts
    # Ranks sharing a domain get equal cores, one apart at most.
    for dom in domains:
        inside = [topo.physical_cores(p.cpus) for p in plan if set(p.cpus) <= dom]
        if len(inside) > 1 and all(len(core) == len(topo.cores[0]) for core in topo.cores):
            assert max(inside) - min(inside) <= 1
    if threads is not None:
        smallest = min(len(p.cpus) for p in plan)
        try:
            again = plan_ranks(topo, ranks, threads, prefer)
        except ValueError as exc:
            assert threads > smallest and "threads per rank" in str(exc)
        else:
            assert threads <= smallest and [p.cpus for p in again] == [p.cpus for p in plan]
            assert {p.threads for p in again} == {threads}


# ---------------------------------------------------------------- launchers


def _where_am_i():
    import torch

    return sorted(os.sched_getaffinity(0)), os.environ[CPUS_ENV], os.environ[THREADS_ENV], torch.get_num_threads()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_launch_pins_each_rank():
    import tp_engine

    plan = plan_ranks(read_topology(), 2)
    out = tp_engine.launch(_where_am_i, 2, placements=plan, timeout=120)
    assert out == [(list(sorted(p.cpus)), p.cpulist(), str(p.threads), p.threads) for p in plan]
    with pytest.raises(ValueError, match="1 placements for 2 ranks"):
        tp_engine.launch(_where_am_i, 2, placements=plan[:1])


def test_cli_ranks_per_host_refusals(capsys):
    from tp_engine import cli

    n = len(read_topology().cpus)
    for args, message in [
        (["--ranks-per-host", "two"], "--ranks-per-host must be auto, l3 or a positive integer, got 'two'"),
        (["--ranks-per-host", "0"], "--ranks-per-host must be auto, l3 or a positive integer"),
        (["--ranks-per-host", "auto", "--nproc", "64"], "--nproc 64 starts every rank on this host, but --ranks-per-host"),
        (["--ranks-per-host", str(n + 1)], f"{n + 1} ranks but this host lets this process use {n} CPUs"),
    ]:
        assert cli.main(["generate", *args]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_cli_plans_the_host_and_each_rank_pins_itself(monkeypatch, capsys):
    from tp_engine import cli, spawn

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", CPUS_ENV, THREADS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    started = {}
    monkeypatch.setattr(cli, "_check_plan_before_spawn", lambda args: None)
    monkeypatch.setattr(spawn, "run_local_ranks", lambda argv, n, **kw: started.update(argv=argv, n=n, **kw) or 0)
    assert cli.main(["generate", "--ranks-per-host", "2", "--greedy"]) == 0
    plan = plan_ranks(read_topology(), 2)
    assert started["n"] == 2 and started["rank_env"] == [p.env() for p in plan]
    assert "--ranks-per-host" in started["argv"]

    # The rank's side under torchrun: no TP_ENGINE_CPUS, so it plans the host and takes its share.
    pinned = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: pinned.append(set(cpus)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = cli.build_parser().parse_args(["generate", "--ranks-per-host", "auto"])
    cli._pin_this_rank(args)
    assert pinned == [set(plan[1].cpus)] and os.environ[CPUS_ENV] == plan[1].cpulist()
    monkeypatch.delenv(CPUS_ENV)
    with pytest.raises(cli.UsageError, match="--ranks-per-host 3, but the launcher started 2 rank"):
        cli._pin_this_rank(cli.build_parser().parse_args(["generate", "--ranks-per-host", "3"]))
