"""ZeRO stage 1 against one process: every rank runs `ShardedOptimiser` on its own
gradients, and, as the reference, the ordinary chain on the mean of every rank's gradients
(each rank makes them all, from one seed).  Each check prints `ok <name>` on rank 0; the
job ends with `rank R: N checks passed` on every rank."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
from ranks import world

import composeopt as co
from composeopt import dist
from composeopt.dist import sharded as sharded_module
from composeopt.errors import DistributedError, NonFiniteError, ShapeMismatchError

comm = world()
rank, size = comm.rank, comm.size
passed = []


def check(name: str, ok: bool) -> None:
    """Every rank's verdict, combined: the check fails on every rank if it failed on one."""
    verdict = np.array([0.0 if ok else 1.0])
    comm.allreduce_(verdict, "sum")
    if verdict[0] > 0:
        raise SystemExit(f"rank {rank}: check {name} failed on {int(verdict[0])} rank(s) (here: {ok})")
    passed.append(name)
    if rank == 0:
        print("ok", name, flush=True)


def shapes_flat() -> dict[str, tuple[int, ...]]:
    # Odd sizes so that the flat runs cut leaves in the middle; a 0-d leaf and a matrix.
    return {"w": (7, 5), "b": (3,), "s": (), "v": (11,)}


def dyadic(rng: np.random.Generator, shape: tuple[int, ...], dtype: object = np.float64) -> np.ndarray:
    """Multiples of 1/1024 of magnitude below 4: their sums, squares and means over 2 or 4
    ranks are exact in float64, so that any order of summing gives the same bits."""
    return np.asarray(rng.integers(-4096, 4096, size=shape) / 1024, dtype=dtype)


def all_grads(
    step: int, shapes: dict[str, tuple[int, ...]], make: object = dyadic
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1000 + step)
    return [{k: make(rng, shape) for k, shape in shapes.items()} for _ in range(size)]  # type: ignore[operator]


def mean_of(grads: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: sum(g[k] for g in grads) / size for k in grads[0]}


def leaves_of(state: object) -> list[object]:
    """A state's arrays and numbers, in order."""
    if isinstance(state, (tuple, list)):
        return [leaf for item in state for leaf in leaves_of(item)]
    if isinstance(state, co.State):
        return [leaf for value in vars(state).values() for leaf in leaves_of(value)]
    return [] if state is None else [state]


def same_state(zopt: dist.ShardedOptimiser, reference: co.Rule, ref_params: dict, exact: bool) -> bool:
    """This rank's pieces of the inner state against the same elements of the one-process
    state (all ranks' pieces together cover every element)."""
    layout = zopt.layout
    store, ref_store = co.state_store(zopt.rule), co.state_store(reference)
    local = zopt.local_tree()
    ok = store.step == ref_store.step
    for piece in layout.pieces_of(rank):
        path = layout.paths[piece.leaf]
        key = path.split("'")[1]
        mine, theirs = leaves_of(store.get(local[path])), leaves_of(ref_store.get(ref_params[key]))
        ok = ok and len(mine) == len(theirs)
        leaf_size = int(np.prod(layout.shapes[piece.leaf]))
        for a, b in zip(mine, theirs):
            per_element = isinstance(b, np.ndarray) and b.size == leaf_size
            a, b = np.asarray(a), np.asarray(b)
            if per_element:  # the piece's elements
                b = b.reshape(-1)[piece.start : piece.stop]
                a = a.reshape(-1)
            elif b.ndim and layout.mode == "whole":
                a = a.reshape(b.shape)
            ok = ok and (np.array_equal(a, b) if exact else np.allclose(a, b, rtol=1e-9, atol=1e-12))
    return bool(ok)


def run(
    rule: co.Rule,
    shapes: dict[str, tuple[int, ...]],
    steps: int,
    make: object = dyadic,
    mode: str | None = None,
    local_only: bool = False,
    strided: bool = False,
) -> tuple[dist.ShardedOptimiser, co.Rule, dict, dict]:
    """`steps` steps of ZeRO-1 and of the one-process reference from the same start."""
    reference = copy.deepcopy(rule)
    zopt = dist.ShardedOptimiser(rule, comm, mode=mode)
    rng = np.random.default_rng(7)
    params = {k: make(rng, shape) for k, shape in shapes.items()}  # type: ignore[operator]
    ref_params = {k: v.copy() for k, v in params.items()}
    for step in range(steps):
        grads = all_grads(step, shapes, make)
        mine = grads[rank]
        if strided:  # a transposed view: packed, not refused
            mine = {k: (np.ascontiguousarray(v.T).T if v.ndim == 2 else v) for k, v in mine.items()}
        with local_only_norms() if local_only else contextlib.nullcontext():
            co.update_(zopt, params, mine)
        co.update_(reference, ref_params, mean_of(grads))
    return zopt, reference, params, ref_params


@contextlib.contextmanager
def local_only_norms():
    """The negative control: the inner step without the ranks' combined reductions."""
    kept = sharded_module._collective.across
    sharded_module._collective.across = lambda comm: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        yield
    finally:
        sharded_module._collective.across = kept  # type: ignore[assignment]


def equal(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def clip_active(omega: float, steps: int, shapes: dict) -> bool:
    norms = [
        np.sqrt(sum(float(np.sum(g**2)) for g in mean_of(all_grads(s, shapes)).values()))
        for s in range(steps)
    ]
    return min(norms) > omega


# --- flat mode: bit for bit ------------------------------------------------------------------
shapes = shapes_flat()
for omega, active in ((0.5, True), (1e6, False)):
    chain = co.Optimiser(co.ClipGlobalNorm(omega), co.AdamW(1e-2, lambda_=1e-2))
    zopt, reference, params, ref_params = run(chain, shapes, 21, strided=True)
    check(
        f"flat mode ({zopt.mode}), clip {'active' if active else 'inactive'}: params",
        equal(params, ref_params),
    )
    check(f"flat clip {omega}: the clip is as meant", clip_active(omega, 21, shapes) == active)
    check(f"flat clip {omega}: state", same_state(zopt, reference, ref_params, exact=True))
    check(
        f"flat clip {omega}: every rank the same params",
        all(len(set(comm.allgather_bytes(params[k].tobytes()))) == 1 for k in params),
    )

chain = co.Optimiser(co.ClipGlobalNorm(0.5), co.AdamW(1e-2))
zopt, reference, params, ref_params = run(chain, shapes, 5, local_only=True)
check("negative control: the clip by the local norm only differs", not equal(params, ref_params))

# --- whole mode ------------------------------------------------------------------------------
matrices = {"w": (6, 4), "u": (4, 6), "c": (5, 5), "b": (6,)}
for name, rule, exact in (
    ("ClipNorm+Adam", co.Optimiser(co.ClipNorm(2.0), co.Adam(1e-2)), True),
    ("Lamb", co.Lamb(1e-2), True),
    ("Adafactor", co.Adafactor(1e-2), True),
    # One process orthogonalises the matrices of one shape (and the transposes of tall ones) as one
    # stack; spread over the ranks the stacks are smaller, and a stacked matmul rounds otherwise.
    ("Muon", co.Muon(1e-2), size == 2),
    ("Groups", co.Groups(("w", co.Adam(1e-2)), ("c", co.Lamb(1e-2)), default=co.Descent(0.1)), True),
    ("ClipGlobalNorm+Lamb", co.Optimiser(co.ClipGlobalNorm(0.5), co.Lamb(1e-2)), True),
    # The dot products add the ranks' parts in another order than one process does.
    ("LBFGS", co.LBFGS(0.05, memory=3), False),
):
    zopt, reference, params, ref_params = run(rule, matrices, 8)
    close = (
        equal(params, ref_params)
        if exact
        else all(np.allclose(params[k], ref_params[k], rtol=1e-12, atol=1e-13) for k in params)
    )
    check(f"whole mode ({zopt.mode}) {name}: params", close)
    check(f"whole {name}: state", same_state(zopt, reference, ref_params, exact=exact))

# --- more ranks than leaves: ranks without a piece still take part ---------------------------
few = {"a": (3, 2), "z": (4,)}
for name, rule, exact in (
    ("ClipGlobalNorm+Lamb", co.Optimiser(co.ClipGlobalNorm(0.5), co.Lamb(1e-2)), True),
    (
        "SkipNonFinite+ClipNorm",
        co.SkipNonFinite(co.Optimiser(co.ClipNorm(1.0, throw=False), co.Adam(1e-2))),
        True,
    ),
    ("LBFGS", co.LBFGS(0.05, memory=2), False),
    ("Groups", co.Groups(("a", co.Lamb(1e-2)), default=co.Adam(1e-2)), True),
):
    zopt, reference, params, ref_params = run(rule, few, 5)
    close = (
        equal(params, ref_params)
        if exact
        else all(np.allclose(params[k], ref_params[k], rtol=1e-12, atol=1e-13) for k in params)
    )
    check(
        f"{len(few)} leaves on {size} ranks, {name}", close and same_state(zopt, reference, ref_params, exact)
    )
    check(f"{len(few)} leaves, {name}: empty shards", (len(zopt.local_tree()) == 0) == (rank >= len(few)))


# --- float32, realistic gradients ------------------------------------------------------------
def normal32(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(1 + rng.standard_normal(shape), dtype=np.float32)


chain = co.Optimiser(co.ClipGlobalNorm(1.0), co.AdamW(1e-3))
zopt, reference, params, ref_params = run(chain, {"w": (33, 17), "b": (17,)}, 20, make=normal32)
ulps = max(
    int(np.max(np.abs(params[k].view(np.int32).astype(np.int64) - ref_params[k].view(np.int32))))
    for k in params
)
check(f"float32 within a few ulps (at most {ulps})", ulps <= 4 and params["w"].dtype == np.float32)

# --- SkipNonFinite: a NaN on one rank skips the step on every rank ----------------------------
# AccumGrad(1) has no fast path: the second chain takes the generic path of every rule.
for path, inner in (
    ("fused", co.Optimiser(co.ClipGlobalNorm(0.5), co.AdamW(1e-2))),
    ("generic", co.Optimiser(co.ClipGlobalNorm(0.5), co.AccumGrad(1), co.AdamW(1e-2))),
):
    chain = co.SkipNonFinite(inner)
    zopt = dist.ShardedOptimiser(chain, comm)
    reference = copy.deepcopy(chain)
    params = {k: dyadic(np.random.default_rng(3), s) for k, s in shapes.items()}
    ref_params = {k: v.copy() for k, v in params.items()}
    for step in range(4):
        grads = all_grads(step, shapes)
        if step == 2:
            grads[size - 1]["b"][1] = np.nan  # only the last rank's gradient, of a leaf rank 0 owns
        before = {k: v.copy() for k, v in params.items()}
        co.update_(zopt, params, grads[rank])
        co.update_(reference, ref_params, mean_of(grads))
        if step == 2:
            check(f"{path} ({zopt.mode}): NaN on one rank: every rank skipped", equal(params, before))
    check(
        f"{path} SkipNonFinite and ClipGlobalNorm: as one process",
        equal(params, ref_params) and same_state(zopt, reference, ref_params, True),
    )
    skipped = [s.skipped for s in (co.state_store(zopt.rule).get(x) for x in zopt.local_tree().values())]
    check(f"{path} SkipNonFinite: the skip is counted", all(n == 1 for n in skipped))

# --- faults: every rank raises, nothing changes -----------------------------------------------
zopt = dist.ShardedOptimiser(co.Optimiser(co.ClipNorm(1.0), co.Adam(1e-2)), comm)
params = {k: dyadic(np.random.default_rng(4), s) for k, s in matrices.items()}
co.update_(zopt, params, all_grads(0, matrices)[rank])
kept_params = {k: v.copy() for k, v in params.items()}
kept_states = [copy.deepcopy(co.state_store(zopt.rule).get(x)) for x in zopt.local_tree().values()]


def unchanged() -> bool:
    states = [co.state_store(zopt.rule).get(x) for x in zopt.local_tree().values()]
    same = all(
        all(np.array_equal(a, b) for a, b in zip(leaves_of(s), leaves_of(t)))
        for s, t in zip(states, kept_states)
    )
    return same and equal(params, kept_params) and co.state_store(zopt.rule).step == 1


grads = all_grads(1, matrices)[rank]
if rank == 1:
    grads = {**grads, "w": np.ones((4, 6))}
try:
    co.update_(zopt, params, grads)
    caught = None
except (ShapeMismatchError, DistributedError) as err:
    caught = err
print(f"rank {rank}: shape fault: {type(caught).__name__}: {caught}", flush=True)
expected = ShapeMismatchError if rank == 1 else DistributedError
check("shape mismatch on one rank: every rank raised its error", type(caught) is expected)
check("shape mismatch: nothing changed", unchanged())

grads = all_grads(1, matrices)[rank]
grads["c"] = grads["c"] * np.inf  # the rank that owns c finds an infinite norm
owner = zopt.layout.pieces[
    [p.leaf for p in zopt.layout.pieces].index(zopt.layout.paths.index("params['c']"))
].rank
try:
    co.update_(zopt, params, grads)
    caught = None
except (NonFiniteError, DistributedError) as err:
    caught = err
print(f"rank {rank}: inner fault: {type(caught).__name__}: {caught}", flush=True)
check(
    "ClipNorm raising on one rank's shard: every rank raised",
    type(caught) is (NonFiniteError if rank == owner else DistributedError),
)
check("inner fault: no rank's params or states changed", unchanged())
co.update_(zopt, params, all_grads(2, matrices)[rank])
check("a step after the faults goes on", co.state_store(zopt.rule).step == 2)

# --- the state of a rank is 1/N of the whole ---------------------------------------------------
big = {"w": (64, 33), "b": (33,), "v": (100,)}
zopt, reference, params, ref_params = run(co.AdamW(1e-3), big, 1)
mine = sum(
    a.nbytes
    for x in zopt.local_tree().values()
    for a in leaves_of(co.state_store(zopt.rule).get(x))
    if isinstance(a, np.ndarray)
)
whole = sum(
    a.nbytes
    for x in ref_params.values()
    for a in leaves_of(co.state_store(reference).get(x))
    if isinstance(a, np.ndarray)
)
print(f"rank {rank}: state {mine} of {whole} bytes", flush=True)
check("state per rank about 1/N", abs(mine - whole / size) <= 2 * 8 + 64)
check(
    "checkpoint helper: state_dict of the local tree",
    len(co.state_dict(zopt.rule, zopt.local_tree())["states"]) == len(zopt.local_tree()),
)

print(f"rank {rank}: {len(passed)} checks passed", flush=True)
