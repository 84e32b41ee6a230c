"""Host identity and the hierarchical all-reduce (shared memory inside hosts, TCP between leaders).

On one machine the host groups are forced with TP_ENGINE_HOST_ID (the
documented test override); as root, a rank in a private /dev/shm mount and,
with the simulated-host harness, 2 hosts x 2 ranks in separate namespaces
check the real identity and the real path.
"""
from __future__ import annotations

import copy
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tp_engine
from conftest import run_ranks, tiny_model
from tp_engine.comm.host_identity import HOST_ID_ENV, HostLayout, RankFacts, group_hosts, local_facts

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [[5, 17, 42, 99, 3, 250, 8, 61]]
NEW_TOKENS = 8

# -- the pure grouping ------------------------------------------------------------------


def _compatible(facts, can_map, a, b) -> bool:
    return facts[a].key == facts[b].key and can_map[a][b] and can_map[b][a]


@st.composite
def _hidden_hosts(draw):
    """Ranks on hidden hosts; hosts on hidden machines (containers share a boot id)."""
    n = draw(st.integers(1, 12))
    host = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    machine_of_host = draw(st.lists(st.integers(0, 2), min_size=5, max_size=5))
    facts = [RankFacts(machine=f"boot-{machine_of_host[h]}", hostname=f"h{h}") for h in host]
    can_map = [[host[i] == host[j] for j in range(n)] for i in range(n)]
    return host, facts, can_map


@given(_hidden_hosts())
@settings(max_examples=200, deadline=None)
def test_groups_are_the_hidden_hosts(case):
    host, facts, can_map = case
    layout = group_hosts(facts, can_map)
    expected = {}
    for r, h in enumerate(host):
        expected.setdefault(h, []).append(r)
    assert sorted(layout.groups) == sorted(tuple(g) for g in expected.values())
    assert list(layout.leaders) == sorted(layout.leaders)
    assert all(layout.hostnames[layout.host_of(r)] == f"h{host[r]}" for r in range(len(host)))


@given(st.integers(1, 10).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from(["b0", "b1", ""]), min_size=n, max_size=n),
    st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=n, max_size=n),
)))
@settings(max_examples=300, deadline=None)
def test_groups_from_any_probe_results_can_all_share_memory(case):
    boots, can_map = case
    n = len(boots)
    facts = [RankFacts(machine=b, hostname=f"name{i % 2}") for i, b in enumerate(boots)]
    layout = group_hosts(facts, can_map)
    assert sorted(r for g in layout.groups for r in g) == list(range(n))
    for g in layout.groups:
        # every pair inside a host can share memory, with the same machine key
        assert all(_compatible(facts, can_map, a, b) for a in g for b in g if a != b)
    for h, g in enumerate(layout.groups):
        # a host starts only when its leader fits in no earlier host
        for earlier in layout.groups[:h]:
            assert not all(_compatible(facts, can_map, g[0], m) for m in earlier if m < g[0])


def test_same_boot_id_without_shared_memory_is_two_hosts():
    facts = [RankFacts("boot", "same-name")] * 4
    reach = [[True, True, False, False], [True, True, False, False], [False, False, True, True], [False, False, True, True]]
    assert group_hosts(facts, reach).groups == ((0, 1), (2, 3))
    # one-way mapping is not enough: both must map each other's segment
    reach = [[True, True], [False, True]]
    assert group_hosts(facts[:2], reach).groups == ((0,), (1,))


def test_without_boot_id_the_hostname_separates():
    facts = [RankFacts("", "a"), RankFacts("", "b"), RankFacts("", "a")]
    assert group_hosts(facts, [[True] * 3] * 3).groups == ((0, 2), (1,))


def test_layout_checks_itself():
    with pytest.raises(ValueError, match="partition"):
        HostLayout(((0, 1), (1, 2)), ("a", "b"))
    with pytest.raises(ValueError, match="sorted"):
        HostLayout(((2, 3), (0, 1)), ("a", "b"))
    with pytest.raises(ValueError, match="4x4|3x3"):
        group_hosts([RankFacts("b", "h")] * 3, [[True] * 3] * 2)
    layout = HostLayout(((0, 2), (1,)), ("a", "b"))
    assert (layout.n_hosts, layout.leaders, layout.max_local, layout.host_of(2)) == (2, (0, 1), 2, 0)
    assert layout.describe() == "2 hosts: a [0, 2], b [1]"


def test_host_id_override(monkeypatch):
    monkeypatch.setenv(HOST_ID_ENV, "x,y,x")
    assert local_facts(1).machine == "override:y" and local_facts(2).machine == "override:x"
    with pytest.raises(ValueError, match="names 3 ranks"):
        local_facts(3)
    monkeypatch.setenv(HOST_ID_ENV, "solo")
    assert local_facts(7).machine == "override:solo"
    monkeypatch.delenv(HOST_ID_ENV)
    assert not local_facts(0).machine.startswith("override:")


# -- collectives on one machine, host groups forced ------------------------------------


def _inputs(rank: int, numel: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g).to(dtype)
    return torch.randint(-1000, 1000, (numel,), generator=g, dtype=dtype)


def _hier_sum(groups, numel, dtype=torch.float32) -> torch.Tensor:
    """Host sums in rank order, then the host sums in host order (in float32 for 16-bit floats)."""
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    total = None
    for g in groups:
        host = None
        for r in g:
            x = _inputs(r, numel, dtype).to(work)
            host = x.clone() if host is None else host + x
        total = host if total is None else total + host
    return total.to(dtype)


SIZES = (1, 1000, 300_000)  # 300k float32 = 1.2 MB: more than one shared-memory chunk


def _collectives(labels: str):
    os.environ[HOST_ID_ENV] = labels
    rt = tp_engine.init()
    c, r, w = rt.comm, rt.rank, rt.world_size
    out = {"name": c.name, "groups": c.layout.groups}
    for n in SIZES:
        out[("sum", n)] = c.all_reduce_(_inputs(r, n))
    out["bf16"] = c.all_reduce_(_inputs(r, 999, torch.bfloat16))
    out["int64"] = c.all_reduce_(_inputs(r, 77, torch.int64))
    strided = _inputs(r, 200).view(20, 10).t()  # not contiguous
    out["strided"] = c.all_reduce_(strided).clone()
    # uneven all_gather along a middle dim and along the first
    out["gather1"] = c.all_gather(torch.full((2, r + 1, 3), float(r)), dim=1, sizes=[k + 1 for k in range(w)])
    out["gather0"] = c.all_gather(torch.full((1, 4), r, dtype=torch.int32), dim=0)
    out["bcast"] = [c.broadcast_(torch.full((5,), float(r * 10 + s)), src=s).clone() for s in range(w)]
    c.barrier()
    return out


@pytest.mark.parametrize("labels, groups", [
    ("a,a,b,b", ((0, 1), (2, 3))),   # 2 hosts x 2
    ("a,a,b", ((0, 1), (2,))),       # uneven: 2 + 1
    ("a,b,a,b", ((0, 2), (1, 3))),   # hosts interleaved in rank order
])
def test_hierarchical_collectives_forced_hosts(labels, groups):
    world = len(labels.split(","))
    results = run_ranks(_collectives, world, labels)
    for r, out in enumerate(results):
        assert out["name"] == "hier(shm+tcp)", out["name"]
        assert out["groups"] == groups
        for n in SIZES:
            expected = _hier_sum(groups, n)
            assert torch.equal(out[("sum", n)], expected), (r, n)  # the fixed order, bit for bit
            plain = sum(_inputs(k, n, torch.float64) for k in range(world)).float()
            torch.testing.assert_close(out[("sum", n)], plain, rtol=1e-5, atol=1e-5)
        assert torch.equal(out["bf16"], _hier_sum(groups, 999, torch.bfloat16))
        assert torch.equal(out["int64"], sum(_inputs(k, 77, torch.int64) for k in range(world)))
        assert torch.equal(out["strided"], _hier_sum(groups, 200).view(20, 10).t())
        assert torch.equal(out["gather1"], torch.cat([torch.full((2, k + 1, 3), float(k)) for k in range(world)], dim=1))
        assert torch.equal(out["gather0"], torch.arange(world, dtype=torch.int32)[:, None].expand(world, 4))
        for s in range(world):
            assert torch.equal(out["bcast"][s], torch.full((5,), float(s * 10 + s)))


def _one_rank_per_host():
    os.environ[HOST_ID_ENV] = "a,b"
    rt = tp_engine.init()
    return rt.comm.name, rt.comm.all_reduce_(_inputs(rt.rank, 4096))


def test_one_rank_per_host_takes_the_network_path():
    for name, total in run_ranks(_one_rank_per_host, 2):
        assert name == "tcp"
        assert torch.equal(total, _inputs(0, 4096) + _inputs(1, 4096))


# -- failures are errors naming the rank, not hangs ----------------------------------


def _tcp_pair(mode: str):
    from tp_engine.comm.tcp import tcp_mesh
    from tp_engine.comm.torch_dist import TorchDistCommunicator

    rt = tp_engine.init(backend="gloo")
    mesh = tcp_mesh(TorchDistCommunicator(), [0, 1], address="127.0.0.1", timeout=2.0)
    mesh.all_reduce_(torch.ones(8))  # connected and working
    if mode == "gone" and rt.rank == 1:
        mesh.close()  # as a killed process would: its sockets close
        return "closed"
    if mode == "silent" and rt.rank == 1:
        time.sleep(4)  # longer than the 2 s timeout
        return "slept"
    start = time.monotonic()
    try:
        mesh.all_reduce_(torch.ones(8 if mode != "mismatch" or rt.rank == 0 else 9))
    except RuntimeError as exc:
        return str(exc), time.monotonic() - start
    return "no error", time.monotonic() - start


@pytest.mark.parametrize("mode, words, limit", [
    # A closed socket reads as end-of-file, or as a reset when data was still in flight: either names it.
    ("gone", ("rank 1 closed its connection", "rank 1 is gone"), 3.0),
    ("silent", "rank 1 sent nothing for 2 s", 4.0),
    ("mismatch", "called different collectives", 3.0),
])
def test_tcp_failures_name_the_rank(mode, words, limit):
    message, elapsed = run_ranks(_tcp_pair, 2, mode)[0]
    assert any(w in message for w in ((words,) if isinstance(words, str) else words)), message
    assert elapsed < limit, elapsed


# -- a real second "host" on this machine: same boot id, private /dev/shm --------------


def _private_shm() -> None:
    """Move this process into its own mount namespace with a fresh tmpfs on /dev/shm."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, ms_rec, ms_private = 0x00020000, 0x4000, 1 << 18
    if libc.unshare(clone_newns) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(b"tp_engine_test", b"/dev/shm", b"tmpfs", 0, b"size=64m") != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs /dev/shm")


def _container_rank():
    os.environ.pop(HOST_ID_ENV, None)
    if int(os.environ["RANK"]) == 2:
        _private_shm()
    rt = tp_engine.init()
    return rt.comm.name, rt.comm.layout.groups, rt.comm.all_reduce_(_inputs(rt.rank, 1000))


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/dev/shm"), reason="needs root and /dev/shm (mount namespace)")
def test_private_dev_shm_makes_another_host():
    for name, groups, total in run_ranks(_container_rank, 3):
        assert name == "hier(shm+tcp)"
        assert groups == ((0, 1), (2,))
        assert torch.equal(total, _hier_sum(groups, 1000))


# -- TP=4 over 2 x 2 hosts: logits and greedy tokens against transformers ----------------


def _reference():
    model = tiny_model("llama", 8, 4)
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        logits = model(prompt).logits
    return model, logits, model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)


def _llama(model):
    torch.set_num_threads(1)
    rt = tp_engine.init()
    model = tp_engine.parallelize(model)
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT)).logits
    tokens = tp_engine.generate(model, torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
    return rt.comm.name, logits, tokens


def _llama_forced(model):
    os.environ[HOST_ID_ENV] = "a,a,b,b"
    return _llama(model)


def _check_llama(results, expected_logits, expected_tokens):
    for rank, (name, logits, tokens) in enumerate(results):
        assert name == "hier(shm+tcp)", name
        torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(tokens, expected_tokens), f"rank {rank}"
        assert torch.equal(logits, results[0][1]), "ranks disagree bitwise"


def test_llama_tp4_over_forced_2x2_hosts_matches_transformers():
    model, logits, tokens = _reference()
    _check_llama(run_ranks(_llama_forced, 4, copy.deepcopy(model)), logits, tokens)


# -- simulated hosts: separate network, UTS and mount namespaces -----------------------


def _simhosts_reason() -> str | None:
    try:
        from tp_engine.launch.simhosts import unavailable
    except ImportError:
        return "the simulated-host harness (tp_engine.launch.simhosts) is not here"
    return unavailable()


def _worker_env(rank: int, world: int, local_rank: int, master: str, port: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1",
               RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), MASTER_ADDR=master,
               MASTER_PORT=str(port), TP_ENGINE_TIMEOUT="60")
    env.pop(HOST_ID_ENV, None)
    return env


@pytest.mark.skipif(_simhosts_reason() is not None, reason=str(_simhosts_reason()))
def test_two_simulated_hosts_two_ranks_each(tmp_path):
    from tp_engine.launch.simhosts import SimHosts

    model, logits, tokens = _reference()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with SimHosts(2) as hosts:
        master = hosts.hosts[0].address
        procs = []
        for rank in range(4):
            h, local = divmod(rank, 2)
            argv = [sys.executable, __file__, "simhost", str(tmp_path)]
            procs.append(hosts.popen(h, argv, env=_worker_env(rank, 4, local, master, 29512),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=240)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate()[0] + "\n(timed out)")
        for rank, p in enumerate(procs):
            assert p.returncode == 0, f"rank {rank}:\n{outs[rank][-3000:]}"
    assert "collectives via hier(shm+tcp) over 2 hosts" in outs[0], outs[0][-2000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for name, groups, hostnames, total, _, _ in results:
        assert groups == ((0, 1), (2, 3))
        assert hostnames[0] != hostnames[1]
        assert torch.equal(total, _hier_sum(groups, 5000))
    _check_llama([(name, lg, tk) for name, _, _, _, lg, tk in results], logits, tokens)


def _simhost_worker(outdir: Path) -> None:
    model = tiny_model("llama", 8, 4)
    model.load_state_dict(torch.load(outdir / "model.pt"))
    name, logits, tokens = _llama(model)
    rt = tp_engine.init()
    total = rt.comm.all_reduce_(_inputs(rt.rank, 5000))
    layout = rt.comm.layout
    torch.save((name, layout.groups, layout.hostnames, total, logits, tokens), outdir / f"rank{rt.rank}.pt")
    tp_engine.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "simhost":
        _simhost_worker(Path(sys.argv[2]))
