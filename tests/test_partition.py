"""giblet.data.partition / loader / world: pure splits over many geometries, resume, rank discovery."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from giblet.data import GibletLoader, World, epoch_order, partition, rank_sequence, rank_share
from giblet.data.partition import unit_bounds
from giblet.data.world import world_from_env
from giblet.errors import ConfigError


def deal(n, ws, nw, **kw):
    """{(rank, worker): ids} for one epoch."""
    return {(r, w): partition(n, rank=r, world_size=ws, worker=w, num_workers=nw, **kw)
            for r in range(ws) for w in range(nw)}


def round_robin(parts, batch_size):
    """What a DataLoader delivers: batch i from worker i % W, in order."""
    batches = [[p[i:i + batch_size] for i in range(0, len(p), batch_size)] for p in parts]
    out = [b for row in itertools.zip_longest(*batches) for b in row if b is not None]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


GEOMETRIES = [(ws, nw, n) for ws in (1, 2, 3, 4, 8) for nw in (1, 2, 3, 4) for n in (0, 1, 2, 5, 7, 16, 33, 100, 257)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_equal_lengths_over_many_geometries(drop_last):
    layouts = [(1, 1, 1, 1, 1), (4, 5, 2, 4, 1), (3, 16, 1, 2, 1), (2, 5, 2, 2, 3)]
    for (ws, nw, n), (bs, chunk, mix, lanes, group) in itertools.product(GEOMETRIES, layouts):
        kw = dict(seed=7, epoch=3, chunk_size=chunk, drop_last=drop_last, batch_size=bs, mix_chunks=mix, lanes=lanes,
                  group=group)
        parts = deal(n, ws, nw, **kw)
        per_rank = [sum(len(parts[r, w]) for w in range(nw)) for r in range(ws)]
        expected = n // ws // bs * bs if drop_last else -(-n // ws)  # drop_last: whole batches only
        assert per_rank == [expected] * ws == [rank_share(n, ws, drop_last, bs)] * ws, (ws, nw, n)
        ids = np.concatenate(list(parts.values()))
        counts = np.bincount(ids, minlength=n)
        order = epoch_order(n, seed=7, epoch=3, chunk_size=chunk, mix_chunks=mix)
        if drop_last:  # the end of the shuffled order sits out this epoch
            assert (counts[order[:expected * ws]] == 1).all() and (counts[order[expected * ws:]] == 0).all()
        else:  # pad by wrap: the first (ceil * ws - n) samples of the shuffled order are served again
            assert (counts == np.bincount(np.resize(order, expected * ws), minlength=n)).all(), (ws, nw, n)
            assert (counts >= 1).all() and (counts <= -(-expected * ws // max(n, 1))).all()
        for r in range(ws):  # the workers of a rank split its share: nothing lost, nothing added
            mine = np.concatenate([parts[r, w] for w in range(nw)])
            share = rank_sequence(n, rank=r, world_size=ws, **kw)
            assert (np.sort(mine) == np.sort(share)).all()


def test_delivered_order_is_the_rank_sequence_whatever_the_worker_count():
    kw = dict(seed=1, epoch=0, chunk_size=[3, 8, 8, 5, 8, 1, 8, 9], batch_size=4, mix_chunks=2, lanes=4)
    for ws, rank in ((1, 0), (3, 2)):
        seq = rank_sequence(50, rank=rank, world_size=ws, **kw)
        for nw in (1, 2, 3, 4, 5):
            parts = [partition(50, rank=rank, world_size=ws, worker=w, num_workers=nw, **kw) for w in range(nw)]
            assert (round_robin(parts, 4) == seq).all(), nw


def test_units_of_group_batches_go_round_robin_and_resume_mid_unit():
    kw = dict(rank=0, world_size=1, seed=4, epoch=2, chunk_size=8, batch_size=4, mix_chunks=2, lanes=2, group=3)
    seq = rank_sequence(90, **kw)
    for position, nw in ((0, 1), (0, 2), (8, 2), (16, 3), (44, 4)):
        bounds = unit_bounds(len(seq), position, 12)
        assert bounds[0] == position and (np.diff(bounds[1:-1]) == 12).all() and bounds[-1] == 90
        parts = [partition(90, worker=w, num_workers=nw, position=position, **kw) for w in range(nw)]
        units = [np.split(p, np.cumsum([b - a for a, b in zip(bounds[w:-1:nw], bounds[w + 1::nw])])[:-1])
                 for w, p in enumerate(parts)]
        delivered = [u for row in itertools.zip_longest(*units) for u in row if u is not None]
        assert (np.concatenate(delivered) == seq[position:]).all(), (position, nw)
    chunk_of = np.arange(90) // 8  # lanes stay apart with units: two workers share at most the boundary chunks
    touched = [set(chunk_of[partition(90, worker=w, num_workers=2, **kw)]) for w in range(2)]
    assert len(touched[0] & touched[1]) <= 2


def test_order_depends_on_seed_and_epoch_only_and_is_deterministic():
    kw = dict(rank=1, world_size=2, worker=0, num_workers=2, chunk_size=4, batch_size=2)
    a = partition(100, seed=3, epoch=5, **kw)
    assert (a == partition(100, seed=3, epoch=5, **kw)).all()
    assert not (a == partition(100, seed=3, epoch=6, **kw)).all()
    assert not (a == partition(100, seed=4, epoch=5, **kw)).all()
    plain = epoch_order(10, seed=3, epoch=5, shuffle=False)
    assert (plain == np.arange(10)).all()
    assert (rank_sequence(10, rank=1, world_size=2, seed=0, epoch=0, shuffle=False) == np.arange(5, 10)).all()


def test_chunk_aware_shuffle_keeps_chunks_together_and_mixes_blocks():
    sizes = [16] * 20 + [2] + [16] * 9  # e.g. 2 subjects of 322 and 146 TRs in 16-TR chunks
    n = sum(sizes)
    chunk_of = np.repeat(np.arange(len(sizes)), sizes)
    order = epoch_order(n, seed=0, epoch=0, chunk_size=sizes, mix_chunks=1)
    runs = chunk_of[order]
    assert (np.diff(runs) != 0).sum() == len(sizes) - 1  # each chunk is one contiguous run
    assert not (np.diff(runs) == 1).all()  # chunk order is shuffled
    assert not (order[:16] == np.sort(order[:16])).all()  # and samples within a chunk too
    mixed = chunk_of[epoch_order(n, seed=0, epoch=0, chunk_size=sizes, mix_chunks=3)]
    blocks = [set(mixed[i:i + 48]) for i in range(0, 16 * 3 * 5, 48)]
    assert max(len(b) for b in blocks) <= 4 and min(len(b) for b in blocks) >= 2  # 3 chunks per block


def test_workers_dividing_lanes_read_disjoint_chunks():
    sizes = [16] * 64
    chunk_of = np.repeat(np.arange(64), sizes)
    for nw, lanes in ((2, 4), (4, 4), (2, 2)):
        parts = [partition(1024, rank=0, world_size=1, worker=w, num_workers=nw, seed=2, epoch=0, chunk_size=sizes,
                           batch_size=16, mix_chunks=2, lanes=lanes) for w in range(nw)]
        touched = [set(chunk_of[p]) for p in parts]
        shared = set.union(*[a & b for a, b in itertools.combinations(touched, 2)])
        assert len(shared) <= lanes, (nw, lanes, len(shared))  # only chunks straddling a lane boundary
        lanes_off = [set(chunk_of[partition(1024, rank=0, world_size=1, worker=w, num_workers=nw, seed=2, epoch=0,
                                            chunk_size=sizes, batch_size=16, mix_chunks=2, lanes=1)])
                     for w in range(nw)]
        shared_off = set.union(*[a & b for a, b in itertools.combinations(lanes_off, 2)])
        assert len(shared_off) > 32  # without lanes, consecutive batches of a block go to two workers


def test_position_resumes_with_exactly_the_remaining_samples():
    kw = dict(rank=0, world_size=2, seed=9, epoch=1, chunk_size=7, batch_size=3, mix_chunks=2, lanes=2)
    seq = rank_sequence(61, **kw)
    for position, nw in ((0, 3), (6, 2), (7, 1), (30, 4), (31, 2)):
        parts = [partition(61, worker=w, num_workers=nw, position=position, **kw) for w in range(nw)]
        assert (round_robin(parts, 3) == seq[position:]).all()
    with pytest.raises(ConfigError, match="past the end"):
        partition(61, position=32, **kw)


def test_bad_arguments_fail_with_the_value():
    with pytest.raises(ConfigError, match="rank=2 is outside 0..1"):
        partition(10, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="worker=2"):
        partition(10, rank=0, world_size=1, worker=2, num_workers=2)
    with pytest.raises(ConfigError, match="sum to 9"):
        partition(10, rank=0, world_size=1, chunk_size=[4, 5])
    with pytest.raises(ConfigError, match="batch_size=0"):
        partition(10, rank=0, world_size=1, batch_size=0)


class Ints(torch.utils.data.Dataset):
    """A tiny map-style dataset: sample i is {"index": i}, in 5-sample chunks."""

    chunk_sizes = (5,) * 11 + (2,)

    def __len__(self):
        return 57

    def __getitem__(self, i):
        return {"index": torch.tensor(i)}


def ids(batches):
    return [b["index"].tolist() for b in batches]


def test_loader_resume_mid_epoch_with_another_worker_count_gives_the_same_batches():
    full = GibletLoader(Ints(), batch_size=4, num_workers=2, seed=5, world=World(0, 1))
    epoch0, epoch1 = ids(full), ids(full)
    assert sorted(sum(epoch0, [])) == list(range(57)) and epoch0 != epoch1 and full.epoch == 2
    first = GibletLoader(Ints(), batch_size=4, num_workers=2, seed=5, world=World(0, 1))
    it = iter(first)
    head = ids(next(it) for _ in range(6))
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == 24 and state["seed"] == 5
    del it  # "killed" mid-epoch
    for nw in (0, 1, 3):
        resumed = GibletLoader(Ints(), batch_size=4, num_workers=nw, seed=0, world=World(0, 1))
        resumed.load_state_dict(state)
        assert len(resumed) == 9
        assert head + ids(resumed) == epoch0, nw  # exactly the remaining samples, same batches
        assert ids(resumed) == epoch1  # and the next epoch as if never interrupted


def test_drop_last_serves_whole_batches_only_on_every_rank():
    # 57 samples, 2 ranks, batches of 5: 28 a rank -> 5 whole batches each (3 sit out); without
    # drop_last 29 a rank, the 6th batch holding 4 samples (a second shape for torch.compile).
    for rank in (0, 1):
        loader = GibletLoader(Ints(), batch_size=5, num_workers=2, seed=5, world=World(rank, 2), drop_last=True)
        assert loader.batches_per_epoch == 5 and [len(b) for b in ids(loader)] == [5] * 5
        padded = GibletLoader(Ints(), batch_size=5, num_workers=0, seed=5, world=World(rank, 2))
        assert sorted(len(b) for b in ids(padded)) == [4] + [5] * 5
    both = [GibletLoader(Ints(), batch_size=5, seed=5, world=World(r, 2), drop_last=True) for r in (0, 1)]
    served = sum((sum(ids(x), []) for x in both), [])
    assert len(served) == len(set(served)) == 50  # 7 samples sit out, none is served twice


class Pids(Ints):
    """Also records which process read each sample."""

    def __getitem__(self, i):
        return {"index": torch.tensor(i), "pid": torch.tensor(os.getpid())}


def expected_batches(epoch, group, batch_size=4):
    seq = rank_sequence(57, rank=0, world_size=1, seed=5, epoch=epoch, chunk_size=Ints.chunk_sizes,
                        batch_size=batch_size, mix_chunks=2, lanes=2, group=group)
    return [seq[i:i + batch_size].tolist() for i in range(0, 57, batch_size)]


@pytest.mark.parametrize("group", [1, 3])
def test_persistent_stream_serves_every_epoch_in_order_with_the_same_workers(group):
    # 57 samples in batches of 4: 15 batches, an odd count, so epoch 1 starts on the other worker.
    loader = GibletLoader(Pids(), batch_size=4, num_workers=2, seed=5, world=World(0, 1), group=group)
    pids = set()
    for epoch in range(3):
        batches = list(loader)
        assert ids(batches) == expected_batches(epoch, group), epoch
        pids |= {p for b in batches for p in b["pid"].tolist()}
    assert len(pids) == 2 and os.getpid() not in pids  # two workers, started once for three epochs
    fresh = GibletLoader(Pids(), batch_size=4, num_workers=2, seed=5, world=World(0, 1), group=group,
                         persistent=False)
    pids = {p for _ in range(2) for b in fresh for p in b["pid"].tolist()}
    assert len(pids) == 4  # new workers each epoch
    loader.set_epoch(1)  # moving the loader elsewhere restarts the stream there
    assert ids(loader) == expected_batches(1, group)
    loader.close()


def test_resume_inside_a_unit_with_other_worker_counts():
    first = GibletLoader(Ints(), batch_size=4, num_workers=2, seed=5, world=World(0, 1), group=3)
    it = iter(first)
    head = ids(next(it) for _ in range(4))  # one unit and a third of the next
    state = first.state_dict()
    first.close()
    assert state["order"]["group"] == 3
    for nw in (0, 1, 3):
        resumed = GibletLoader(Ints(), batch_size=4, num_workers=nw, seed=0, world=World(0, 1), group=3)
        resumed.load_state_dict(state)
        assert head + ids(resumed) == expected_batches(0, 3), nw
        assert ids(resumed) == expected_batches(1, 3), nw
        resumed.close()
    other = GibletLoader(Ints(), batch_size=4, num_workers=2, seed=5, world=World(0, 1), group=2)
    other.load_state_dict(state)  # the group is part of the order: the saved one is adopted
    assert other.group == 3 and head + ids(other) == expected_batches(0, 3)
    other.close()


def test_loader_ranks_split_the_epoch_and_refuse_a_changed_order():
    per_rank = [ids(GibletLoader(Ints(), batch_size=3, world=World(r, 3), seed=1)) for r in range(3)]
    flat = sum((sum(p, []) for p in per_rank), [])
    assert [len(sum(p, [])) for p in per_rank] == [19] * 3 and sorted(set(flat)) == list(range(57))
    loader = GibletLoader(Ints(), batch_size=3, world=World(0, 3))
    next(iter(loader))
    state = loader.state_dict()
    other = GibletLoader(Ints(), batch_size=6, world=World(0, 3))
    with pytest.raises(ConfigError, match="batch_size: saved 3, now 6"):
        other.load_state_dict(state)
    other.load_state_dict({**state, "position": 0})  # nothing consumed yet: any order is fine


def test_world_comes_from_torchrun_env_never_from_local_rank():
    assert world_from_env({}) == World(0, 1, 0, 1)
    w = world_from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size) == (5, 8, 1, 4)
    with pytest.raises(ConfigError, match="never taken from LOCAL_RANK"):
        world_from_env({"LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="RANK=4 is outside"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="not an integer"):
        world_from_env({"RANK": "zero", "WORLD_SIZE": "1"})


# -- elastic resume: a checkpoint of N ranks resumed by M ---------------------------------------
def served_after(n, legs, world_size, **kw):
    """Every rank's sequence of what ``legs`` left of the epoch, split over ``world_size`` ranks."""
    return [rank_sequence(n, rank=r, world_size=world_size, legs=legs, **kw) for r in range(world_size)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_elastic_resume_serves_exactly_what_the_saved_ranks_left(drop_last):
    """Any N -> M, any position: nothing consumed is served again; everything left is served
    (padding repeats fewer than M of it; drop_last sets fewer than M * batch_size aside); every
    new rank the same length (DDP); and a second change of world size in the same epoch too."""
    rng = np.random.default_rng(0)
    for case in range(150):
        n, (ws1, ws2, ws3) = int(rng.integers(0, 90)), rng.integers(1, 7, size=3).tolist()
        bs, lanes, group = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 3))
        kw = dict(seed=case, epoch=2, chunk_size=int(rng.integers(1, 9)), drop_last=drop_last, batch_size=bs,
                  mix_chunks=2, lanes=lanes, group=group)
        consumed, legs, kept = [], [], set(range(n))
        for ws, nxt in ((ws1, ws2), (ws2, ws3)):
            seqs = served_after(n, legs, ws, **kw)
            position = int(rng.integers(0, len(seqs[0]) + 1))
            if drop_last:  # what this split serves at all (the rest of the remainder sits out)
                kept = set(np.concatenate([np.zeros(0, np.int64)] + seqs).tolist())
            consumed += [i for s in seqs for i in s[:position].tolist()]
            legs.append((ws, position))
            rest = served_after(n, legs, nxt, **kw)
            assert len({len(s) for s in rest}) == 1, (case, legs)  # equal length on every rank
            flat = np.concatenate(rest).tolist()
            left = kept - set(consumed)
            assert not set(flat) & set(consumed), (case, legs)  # nothing served twice across the resume
            if drop_last:
                assert len(flat) == len(set(flat)) and set(flat) <= left  # none twice
                assert len(flat) == nxt * rank_share(len(left), nxt, True, bs) and len(left) - len(flat) < nxt * bs
            else:
                assert set(flat) == left and len(flat) - len(left) == (-len(left)) % nxt, (case, legs)  # none lost
        for w in (1, 2):  # a resume inside the new split, with workers: exactly the rest of the sequence
            pos = len(rest[0]) // 2 // (bs * group) * (bs * group)  # a unit boundary: round_robin's model
            parts = [partition(n, rank=0, world_size=ws3, worker=i, num_workers=w, legs=legs, position=pos, **kw)
                     for i in range(w)]
            assert (round_robin(parts, bs * group) == rest[0][pos:]).all(), case


def test_loader_resumes_two_ranks_on_one_and_one_on_three_exactly():
    def take(loader, k):
        it = iter(loader)
        return sum(ids(next(it) for _ in range(k)), [])

    # 2 -> 1: 57 samples, 29 a rank (one repeated by padding), 3 batches of 4 taken on each
    two = [GibletLoader(Ints(), batch_size=4, num_workers=0, seed=5, world=World(r, 2)) for r in (0, 1)]
    head = take(two[0], 3) + take(two[1], 3)
    state = two[0].state_dict()
    assert state["position"] == 12 and state["legs"] == [] and two[1].state_dict() == state
    one = GibletLoader(Ints(), batch_size=4, num_workers=2, seed=5, world=World(0, 1))
    one.load_state_dict(state)
    assert one.legs == ((2, 12),) and one.position == 0 and len(one) == 9
    rest = sum(ids(one), [])
    assert sorted(rest + head) == list(range(57)) and len(head) == len(set(head)) == 24  # none lost, none twice
    fresh = GibletLoader(Ints(), batch_size=4, seed=5, world=World(0, 1))
    fresh.set_epoch(1)
    assert ids(one) == ids(fresh) and one.epoch == 2  # the next epoch: whole, over one rank
    one.close()

    # 1 -> 3, then (mid-remainder) 3 -> 2: the legs chain in the state
    single = GibletLoader(Ints(), batch_size=4, seed=5, world=World(0, 1))
    head = take(single, 5)
    three = [GibletLoader(Ints(), batch_size=4, seed=5, world=World(r, 3)) for r in range(3)]
    for loader in three:
        loader.load_state_dict(single.state_dict())
    assert {len(x) for x in three} == {4}  # 37 left: 13 a rank (two repeated by padding), batches 4 4 4 1
    mid = sum((take(x, 1) for x in three), [])
    state = three[0].state_dict()
    assert state["legs"] == [[1, 20]] and state["position"] == 4
    two = [GibletLoader(Ints(), batch_size=4, seed=5, world=World(r, 2)) for r in (0, 1)]
    for loader in two:
        loader.load_state_dict(state)
    assert two[0].legs == two[1].legs == ((1, 20), (3, 4))
    rest = sum((sum(ids(x), []) for x in two), [])
    assert sorted(set(head + mid + rest)) == list(range(57))
    assert not set(rest) & set(head + mid) and len(head + mid) == len(set(head + mid)) == 32
    assert len(rest) - len(set(rest)) == 1  # 25 left over 2 ranks: one padded repeat, as any epoch

    # the order is still checked once the epoch is partly consumed, even at position 0 of a new leg
    other = GibletLoader(Ints(), batch_size=8, seed=5, world=World(0, 2))
    with pytest.raises(ConfigError, match="batch_size: saved 4, now 8"):
        other.load_state_dict({**three[0].state_dict(), "position": 0})
