"""AllReduceMean on every rank against the ordinary chain in one process on the mean gradient.

Each rank rebuilds every rank's gradients (they are seeded by step and rank), so
it computes the single-process reference itself, with a chain that has no
AllReduceMean.  Says one `ok <check>` per check on rank 0; any failure
raises, which aborts the job.
"""

import numpy as np
from mpi4py import MPI
from ranks import world
from steps import (
    CountingComm,
    copy,
    dyadic_grads,
    leaves,
    mean_over,
    params,
    random_grads,
    same_bits,
    say,
    tree_of,
)

import composeopt as co
import composeopt._fused as fused
from composeopt import dist

comm = world()
STEPS = 20


def chain(clip, *first):
    return co.Optimiser(*first, co.ClipGlobalNorm(clip), co.AdamW(1e-2, lambda_=1e-2))


def report(name):
    if comm.rank == 0:
        say(f"ok {name}")


def gathered_equal(tree):
    """Whether every rank holds the same bytes as rank 0."""
    mine = b"".join(leaf.tobytes() for leaf in leaves(tree))
    return all(other == mine for other in comm.allgather_bytes(mine))


def run(opt, grads_of, dtype, steps=STEPS):
    tree = params(dtype)
    for step in range(steps):
        co.update_(opt, tree, grads_of(step))
    return tree


def exact_parity():
    for mode in ("auto", "off"):
        fused.MODE = mode
        for clip in (0.5, 1e6):
            reference = run(
                chain(clip), lambda s: mean_over([dyadic_grads(s, r) for r in range(comm.size)]), "float64"
            )
            # 40 B: the six leaves (of 35, 5, 12, 11, 1 and 2 elements) in five buckets
            for bucket_bytes, buckets in ((40, 5), (25 * 2**20, 1)):
                counting = CountingComm(MPI.COMM_WORLD)
                opt = chain(clip, dist.AllReduceMean(counting, bucket_bytes=bucket_bytes))
                assert (fused.plan(opt) is not None) == (mode == "auto")
                ours = run(opt, lambda s: dyadic_grads(s, comm.rank), "float64")
                assert counting.started == STEPS * buckets, counting.started
                assert same_bits(ours, reference), (mode, clip, bucket_bytes)
                assert gathered_equal(ours), (mode, clip, bucket_bytes)
            alone = run(chain(clip), lambda s: dyadic_grads(s, comm.rank), "float64")
            assert not same_bits(alone, reference), "the control: local gradients must give other params"
            assert not gathered_equal(alone)
            clipped = mean_over([dyadic_grads(0, r) for r in range(comm.size)])
            norm = float(np.sqrt(sum(np.sum(g**2) for g in leaves(clipped))))
            assert (norm > clip) == (clip == 0.5), norm  # the clip acts in one case, not the other
            report(f"float64 bit for bit, fused={mode}, clip={clip}, buckets of 40 B and 25 MiB")
    fused.MODE = "auto"


def ulps(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b) / np.spacing(np.maximum(np.abs(a), np.abs(b))))


def float32_parity():
    reference = run(
        chain(1.0), lambda s: mean_over([random_grads(s, r) for r in range(comm.size)]), "float32"
    )
    ours = run(chain(1.0, dist.AllReduceMean(comm, 256)), lambda s: random_grads(s, comm.rank), "float32")
    worst = max(ulps(a, b) for a, b in zip(leaves(ours), leaves(reference)))
    assert worst <= 8, worst
    assert gathered_equal(ours)
    report(f"float32 within {worst:.0f} ulps")


def accumulation():
    n = 4
    counting = CountingComm(MPI.COMM_WORLD)
    opt = co.Optimiser(co.AccumGrad(n), dist.AllReduceMean(counting, bucket_bytes=200), co.Adam(1e-2))
    tree = params()
    buckets = None
    for step in range(2 * n):
        before = counting.started
        co.update_(opt, tree, dyadic_grads(step, comm.rank))
        if step % n == n - 1:
            buckets = counting.started - before
            assert buckets > 1, buckets  # several buckets, each one call
        else:
            assert counting.started == before, step  # nothing is sent between the updates
    assert counting.started == 2 * buckets
    reference = run(
        co.Optimiser(co.AccumGrad(n), co.Adam(1e-2)),
        lambda s: mean_over([dyadic_grads(s, r) for r in range(comm.size)]),
        "float64",
        steps=2 * n,
    )
    assert same_bits(tree, reference)
    report(f"AccumGrad({n}): {counting.started} all-reduces in {2 * n} steps, bit for bit")


def large_float16(rank):
    rng = np.random.default_rng([rank, 13])
    return tree_of(lambda path, shape: rng.uniform(3e4, 6e4, shape).astype("float16"))


def two_byte_floats():
    dtypes = ["float16"]
    try:
        import ml_dtypes

        dtypes.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    for dtype in dtypes:
        if dtype == "float16":  # near its largest value: its sums would overflow, float32's do not
            rank_grads = [large_float16(r) for r in range(comm.size)]
        else:
            rank_grads = [random_grads(0, r, dtype) for r in range(comm.size)]
        expected = mean_over(rank_grads, "float32")
        if dtype == "float16" or comm.size > 2:  # two ranks' mean rounds once either way
            with np.errstate(over="ignore"):
                assert not same_bits(expected, mean_over(rank_grads))
        tree = params(dtype)
        reference = copy(tree)
        co.update_(co.Descent(1.0), reference, expected)
        co.update_(co.Optimiser(dist.AllReduceMean(comm), co.Descent(1.0)), tree, rank_grads[comm.rank])
        assert same_bits(tree, reference), dtype
        report(f"{np.dtype(dtype).name} summed in float32")


def strided():
    base = {"w": np.zeros((6, 10)), "v": np.zeros(20)}
    tree = {"w": base["w"][::2, 1::3], "v": base["v"][::-2]}  # views, neither contiguous
    reference = {"w": np.zeros((3, 3)), "v": np.zeros(10)}

    def grads(rank):
        rng = np.random.default_rng([rank, 3])
        g = {"w": rng.integers(-64, 64, (3, 6)) / 64, "v": rng.integers(-64, 64, 30) / 64}
        return {"w": g["w"][:, ::2], "v": g["v"][::3]}  # (3, 3) and (10,), strided

    co.update_(co.Optimiser(dist.AllReduceMean(comm), co.Adam(0.1)), tree, grads(comm.rank))
    co.update_(co.Adam(0.1), reference, mean_over([grads(r) for r in range(comm.size)]))
    assert same_bits(tree, reference)
    assert not base["w"][1::2].any()  # the rows between the view's rows are left alone
    report("strided params and gradients")


def mixed_dtypes():
    kinds = ["float64", "float32", "float16", "float32", "float64", "float16"]
    it = iter(kinds * 2)
    tree = tree_of(lambda path, shape: np.zeros(shape, dtype=next(it)))
    kinds_of = [leaf.dtype for leaf in leaves(tree)]

    def grads(rank):
        rng = np.random.default_rng([rank, 5])
        it = iter(kinds_of)
        return tree_of(lambda path, shape: (rng.integers(-512, 512, shape) / 512).astype(next(it)))

    reference = copy(tree)
    co.update_(
        co.Optimiser(dist.AllReduceMean(comm, bucket_bytes=64), co.Descent(0.5)), tree, grads(comm.rank)
    )
    co.update_(co.Descent(0.5), reference, mean_over([grads(r) for r in range(comm.size)], "float64"))
    assert same_bits(tree, reference)
    assert [leaf.dtype for leaf in leaves(tree)] == kinds_of
    report("mixed dtypes in one tree")


def collectives():
    """The communicator's other calls, against what they must give on `size` ranks."""
    size, rank = comm.size, comm.rank
    values = np.array([rank + 1.0, -rank])
    for op, expected in (
        ("sum", [size * (size + 1) / 2, -size * (size - 1) / 2]),
        ("max", [size, 0]),
        ("min", [1, 1 - size]),
    ):
        buffer = values.copy()
        comm.allreduce_(buffer, op)
        assert buffer.tolist() == expected, (op, buffer)
    counts = [r + 1 for r in range(size)]  # rank r owns r + 1 elements
    send = np.arange(sum(counts), dtype=np.float64) * (rank + 1)
    mine = np.empty(counts[rank])
    comm.reduce_scatter_sum(send, mine, counts)
    first = sum(counts[:rank])
    assert mine.tolist() == (np.arange(first, first + counts[rank]) * size * (size + 1) / 2).tolist()
    gathered = np.empty(sum(counts))
    comm.allgather_(np.full(counts[rank], float(rank)), gathered, counts)
    assert gathered.tolist() == [float(r) for r in range(size) for _ in range(r + 1)]
    assert comm.broadcast_bytes(b"from root" if rank == size - 1 else None, root=size - 1) == b"from root"
    assert comm.allgather_bytes(b"x" * rank) == [b"x" * r for r in range(size)]  # rank 0 sends nothing
    comm.barrier()
    assert repr(comm) == f"MPIComm(rank={rank}, size={size})"
    report("collectives")


exact_parity()
float32_parity()
accumulation()
two_byte_floats()
strided()
mixed_dtypes()
collectives()
