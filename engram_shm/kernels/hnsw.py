"""HNSW insert and search on flat arrays (one graph per segment).

Graph arrays (layout and writers: see engram_shm/store/layout.py):

| field     | dtype | shape                       | meaning                                   |
|-----------|-------|-----------------------------|-------------------------------------------|
| links0    | int32 | [cap, 2M+1]                 | layer-0 list: [0] count word, [1..] ids   |
| upper     | int32 | [upper_cap, M+1]            | layer l>=1 list of a node: row            |
|           |       |                             | upper_row + l - 1                         |
| level     | int32 | [cap]                       | top layer of the node (drawn by the front)|
| upper_row | int32 | [cap]                       | first of the node's `level` rows in       |
|           |       |                             | `upper`, -1 for layer-0-only nodes        |
| parent    | int32 | [cap]                       | pinned tree parent on layer 0, -1 = none  |
| state     | int64 | [2]                         | [0] entry: (top level << 32) | node, -1  |
|           |       |                             | empty; [1] rewrite journal (see below)    |

A list's count word is its number of links | the length of its stable prefix
<< STABLE_SHIFT: that many first links are a result of the neighbour
heuristic (`_select`), so no two of them need comparing again when the full
list is pruned; links appended after it are compared with all. Pruning then
skips the distances between links that a plain HNSW insert recomputes every
time (most of an insert's work once lists fill up), and keeps the same
links. Lists written otherwise (a node's own first list, a repair) have a
prefix of 0, as do those of layout versions before 3.

Reachability: besides the usual neighbour heuristic, every node but the first
keeps one *pinned* edge pair with an earlier node (its parent): parent->child and
child->parent are never pruned. The pinned edges form a tree in both directions,
so every inserted node is reachable on layer 0 from any other, duplicates
included (plain HNSW loses nodes to pruning).

Crash safety: appending a link is one store then a count bump, safe at any
point. Rewriting a list (pruning, or a node's own list) first records
(layer << 32 | node) + 1 in state[1] behind a fence and clears it after; a
writer that finds the journal set repairs that one list (`repair`) before
inserting: duplicates dropped, pinned edges restored.

Concurrency: one writer per graph; readers traverse while it writes. Every id a
writer stores is a node whose vector is complete, counts are clamped on read, and
results are filtered by `n_admit` (published indexed count) and generation, so a
reader sees a valid, if momentarily partial, graph. Re-inserting a node after a
crash keeps its pinned edges and never duplicates a link.
"""

from collections import namedtuple

import numpy as np
from numba import carray, types
from numba.extending import overload

from ..errors import InvalidArgument
from ..store.layout import (
    ACCEPTED,
    ENTRY,
    HEADER_WORDS,
    INDEXED,
    MAX_GEN,
    MAX_LEVEL,
    MIN_GEN,
    STABLE_SHIFT,
    first_upper_rows,
)
from .atomics import fence
from .cpu import defer_to_recalls, monotonic_ns, sched_yield
from .distance import (
    check_query,
    check_store,
    dist,
    distances_of,
    int16_cue_max,
    int16_cue_width,
    integer_sums,
    stored_dim,
    weight,
    weighted_cue,
    weights_of,
)
from .heap import heap_pop, heap_push, heap_replace_top, heap_sort_ascending, topk_finish, topk_push
from .policy import INT8_MAX, L2, kernel, metric_of, uncounted_inline_kernel, uncounted_kernel
from .scalar import as_f32, pointer_to, prefetch_whole_row, row_factor, set_row_factor, vector_dim

Graph = namedtuple("Graph", "links0 upper level upper_row parent state")
# One segment as a recall sees it: read-only columns, its graph and its header,
# whose counters the kernel reads itself.
SegmentView = namedtuple("SegmentView", "store gens graph header")
# How the space kernel receives them: a row of addresses and sizes per segment
# (a table of int64 costs nothing to pass; a typed list of arrays costs every
# process a second of compilation that Numba cannot cache).
(T_VECTORS, T_GENS, T_LINKS0, T_UPPER, T_LEVEL, T_UPPER_ROW, T_PARENT, T_HEADER,
 T_CAPACITY, T_UPPER_CAP, T_WIDTH) = range(11)
# Caller-owned scratch of one thread: visit marks and heaps sized by capacity,
# small buffers sized by M and ef (tmp_*: also a search's batch of new
# neighbours); `kept`: the rows `_select` has kept, and `base`: the node
# whose links `_add_link` selects again, as cues; `*16`: the same cues of an
# int8 store, as int16 (`_insert_cues`; qbuf16 also a search's, `_search_cue`).
Scratch = namedtuple(
    "Scratch", "visited tag cand_k cand_v res_k res_v qbuf layer_k layer_v layer_n keep_k keep_v keep_f "
               "tmp_k tmp_v tmp_f kept base qbuf16 kept16 base16")

GEN_ANY = np.uint64(np.iinfo(np.uint64).max)
_EMPTY = np.int64(-1)
_LOW32 = np.int64(0xFFFFFFFF)
_COUNT_MASK = np.int32((1 << STABLE_SHIFT) - 1)
# Visit marks are uint16, half the cache lines of int32 ones (their loads
# drew a twentieth of an int8 insert's search samples under perf); they are
# cleared every 65,535 searches.
_MAX_TAG = 65535
DUPLICATE = np.float32(1e-6)  # distances this small are rounding: the vectors are equal


@uncounted_inline_kernel
def _row(g, node, layer):
    """The link list of `node` on `layer`, or an empty slice if it has none."""
    if layer == 0:
        return g.links0[node]
    first = g.upper_row[node]
    if first < 0 or layer > g.level[node] or layer > MAX_LEVEL or first + layer > g.upper.shape[0]:
        return g.links0[node, :1][:0]
    return g.upper[first + layer - 1]


@uncounted_kernel
def _count(row):
    if row.shape[0] == 0:
        return 0
    return min(max(row[0] & _COUNT_MASK, 0), row.shape[0] - 1)


@uncounted_kernel
def _stable(row, cnt):
    """How many of a list's first links are known heuristic-stable."""
    return min((row[0] >> STABLE_SHIFT) & _COUNT_MASK, cnt)


@uncounted_kernel
def _next_tag(sc):
    tag = sc.tag[0] + 1
    if tag > _MAX_TAG:
        sc.visited[:] = 0
        tag = 1
    sc.tag[0] = tag
    return tag


@uncounted_kernel
def _admit(node, exclude, n_admit, gens, gen_max):
    # An insert's search admits every generation: reading gens[node] there
    # was a cache miss per admitted node for nothing (a tenth of an int8
    # insert's search samples under perf).
    return node != exclude and node < n_admit and (gen_max == GEN_ANY or gens[node] <= gen_max)


@uncounted_kernel
def _unvisited(store, row, tag, sc):
    """The valid links of a list not visited yet by the search `tag`, into
    sc.tmp_v: marked visited, their rows prefetched. Returns how many."""
    cap = store.shape[0]
    n = 0
    for t in range(1, _count(row) + 1):
        nb = row[t]
        if nb >= 0 and nb < cap:
            # Without a branch on the mark, which would miss often: every
            # link is written and marked, and only an unvisited one counted.
            fresh = sc.visited[nb] != tag
            sc.visited[nb] = tag
            sc.tmp_v[n] = nb
            n += fresh
    for t in range(n):
        prefetch_whole_row(store, sc.tmp_v[t])
    return n


@uncounted_kernel
def _search_layer(store, gens, g, q, ep, ep_d, ef, layer, metric, n_admit, gen_max, exclude, sc):
    """Beam search of width `ef` on one layer from `ep`. Leaves the admitted
    results in sc.res_k (negated distances) / sc.res_v as a heap; returns its size.
    An expanded candidate's new neighbours are gathered first (rows
    prefetched), their distances taken next, four rows at a time, and the heaps
    updated last: the rows' loads and sums overlap instead of each waiting
    behind the last one's heap update and its branches."""
    tag = _next_tag(sc)
    sc.visited[ep] = tag
    n_cand = heap_push(sc.cand_k, sc.cand_v, 0, ep_d, np.int32(ep))
    n_res = 0
    if _admit(ep, exclude, n_admit, gens, gen_max):
        n_res = heap_push(sc.res_k, sc.res_v, 0, -ep_d, np.int32(ep))
    while n_cand > 0:
        c_d = sc.cand_k[0]
        c = sc.cand_v[0]
        if n_res >= ef and c_d > -sc.res_k[0]:
            break
        if layer == 0:  # its list, on its way while the pop sifts (the guess below often misses)
            prefetch_whole_row(g.links0, c)
        n_cand = heap_pop(sc.cand_k, sc.cand_v, n_cand)
        if n_cand > 0 and layer == 0:  # the list likely read next, unless a new neighbour comes first
            prefetch_whole_row(g.links0, sc.cand_v[0])
        n_new = _unvisited(store, _row(g, c, layer), tag, sc)
        distances_of(store, sc.tmp_v, n_new, q, metric, sc.tmp_k)
        for t in range(n_new):
            d = sc.tmp_k[t]
            nb = sc.tmp_v[t]
            if n_res < ef or d < -sc.res_k[0]:
                n_cand = heap_push(sc.cand_k, sc.cand_v, n_cand, d, nb)
                if _admit(nb, exclude, n_admit, gens, gen_max):
                    if n_res < ef:
                        n_res = heap_push(sc.res_k, sc.res_v, n_res, -d, nb)
                    else:
                        heap_replace_top(sc.res_k, sc.res_v, n_res, -d, nb)
    return n_res


@uncounted_kernel
def _greedy(store, g, q, ep, ep_d, layer, metric):
    """Walk to a local minimum of the distance to q on one upper layer."""
    cap = store.shape[0]
    moved = True
    while moved:
        moved = False
        row = _row(g, ep, layer)
        cnt = _count(row)
        for t in range(1, cnt + 1):
            nb = row[t]
            if nb < 0 or nb >= cap:
                continue
            d = dist(store, nb, q, 0, metric)
            if d < ep_d:
                ep = nb
                ep_d = d
                moved = True
    return ep, ep_d


def _insert_cues(store, f32, i16):
    """The cue rows an insert compares a store's rows with: float32 (`f32`),
    or int16 for an int8 store (`i16`), whose dot products with codes are
    summed in int32 (distance.integer_sums; jitted code only)."""
    raise NotImplementedError("_insert_cues is for jitted code")


@overload(_insert_cues, inline="always")
def _insert_cues_impl(store, f32, i16):
    if store.dtype == types.int8:
        return lambda store, f32, i16: i16
    return lambda store, f32, i16: f32


@uncounted_kernel
def _load_cue(store, node, metric, out, r):
    """Row `node` of the store as a cue in out[r], as `dist` takes one: its
    factor applied and, under a dot metric, its weights (as
    distance.weighted_cue weights a recall's cue). An int16 cue of int8
    codes holds them as they are under L2; under a dot metric, the weighted
    codes scaled to span +-int16_cue_max (they span +-127 at most), the
    factor divided by that scale. One pass: an insert makes hundreds of
    these cues (a pass for the largest element first cost 14% of int8
    inserts in a throwaway A/B)."""
    dim = vector_dim(store)
    w = weights_of(metric, dim)
    f = row_factor(store, node)
    if integer_sums(store, out):
        if metric.code == L2:
            for j in range(dim):
                out[r, j] = np.int16(store[node, j])
            set_row_factor(out, r, f)
        else:
            scale = np.float32(int16_cue_max(dim)) / np.float32(INT8_MAX)
            for j in range(dim):
                value = as_f32(store[node, j]) * (weight(w, j) * scale)
                out[r, j] = np.int16(np.floor(value + np.float32(0.5)))
            set_row_factor(out, r, f / scale)
    elif metric.code == L2:
        for j in range(dim):
            out[r, j] = as_f32(store[node, j]) * f
    else:
        for j in range(dim):
            out[r, j] = as_f32(store[node, j]) * (weight(w, j) * f)


@uncounted_kernel
def _int16_query(q, out):
    """A float32 query (a one-row matrix, weighted as `dist` takes it) as an
    int16 cue in out[0]: scaled so that its largest element spans
    int16_cue_max, the factor the inverse of that scale (rounding moves an
    element by at most half a unit: 1/65,534 of the largest up to 516
    dimensions, 1/44,034 at 768)."""
    dim = q.shape[1]
    top = np.float32(0.0)
    for j in range(dim):
        top = max(top, abs(q[0, j]))
    scale = np.float32(int16_cue_max(dim)) / top if top > 0 else np.float32(0.0)
    for j in range(dim):
        out[0, j] = np.int16(np.floor(q[0, j] * scale + np.float32(0.5)))
    set_row_factor(out, 0, np.float32(1.0) / scale if top > 0 else np.float32(0.0))


def _search_cue(store, q, q16):
    """The cue a search compares a store's rows with: the float32 query `q`
    (a one-row matrix) as it is, or beside int8 codes as an int16 cue in q16,
    whose sums with the codes are exact int32 ones (distance.integer_sums;
    jitted code only)."""
    raise NotImplementedError("_search_cue is for jitted code")


@overload(_search_cue, inline="always")
def _search_cue_impl(store, q, q16):
    if store.dtype == types.int8:
        def impl(store, q, q16):
            _int16_query(q, q16)
            return q16
        return impl
    return lambda store, q, q16: q


@uncounted_kernel
def _select(store, cand_k, cand_v, n, m, metric, out_k, out_v, n_out, kept, cand_f=None, out_f=None):
    """The HNSW neighbour heuristic: walk candidates in ascending distance to the
    base and keep one unless a kept node is closer to it than the base is, or
    is its duplicate (plain HNSW keeps every duplicate, and a crowd of equal
    vectors then takes all the links of the region). `out` may already hold
    `n_out` nodes (pinned ones) that count as kept. With flags (`cand_f`,
    `out_f`: 0 for a link of a stable prefix), two stable links are not
    compared: they passed each other when that prefix was selected. Kept
    nodes are compared as cues (`kept`, rows for m; int16 beside int8 codes,
    float32 otherwise): each is made once and read against many candidates,
    whose stored rows are then the only ones read as they are stored."""
    for j in range(n_out):
        _load_cue(store, out_v[j], metric, kept, j)
    for i in range(n):
        if n_out >= m:
            break
        c = cand_v[i]
        c_d = cand_k[i]
        good = True
        for j in range(n_out):
            if out_v[j] == c:
                good = False
                break
            if cand_f is not None and cand_f[i] == 0 and out_f[j] == 0:
                continue  # both from the stable prefix: checked when it was selected
            d = dist(store, c, kept, j, metric)
            if d < c_d or d <= DUPLICATE:
                good = False
                break
        if good:
            out_k[n_out] = c_d
            out_v[n_out] = c
            _load_cue(store, c, metric, kept, n_out)
            if cand_f is not None:
                out_f[n_out] = cand_f[i]
            n_out += 1
    return n_out


@uncounted_kernel
def _is_pinned(g, a, b):
    """Is the layer-0 edge a->b part of the pinned tree?"""
    return g.parent[b] == a or g.parent[a] == b


@uncounted_kernel
def _pinned_count(g, node):
    row = g.links0[node]
    cnt = _count(row)
    pinned = 0
    for t in range(1, cnt + 1):
        if _is_pinned(g, node, row[t]):
            pinned += 1
    return pinned


@uncounted_kernel
def _sort_by_key(keys, vals, flags, n):
    for i in range(1, n):
        k = keys[i]
        v = vals[i]
        f = flags[i]
        j = i - 1
        while j >= 0 and keys[j] > k:
            keys[j + 1] = keys[j]
            vals[j + 1] = vals[j]
            flags[j + 1] = flags[j]
            j -= 1
        keys[j + 1] = k
        vals[j + 1] = v
        flags[j + 1] = f


@uncounted_kernel
def _in(values, n, x):
    for i in range(n):
        if values[i] == x:
            return True
    return False


@uncounted_kernel
def _contains(row, cnt, node):
    """Is node among the cnt links of a list row (count at row[0])?"""
    return _in(row[1:], cnt, node)


@uncounted_kernel
def _rewrite(g, node, layer, row, new_v, n_new, stable):
    """Replace a link list by new_v[:n_new] so that a concurrent reader never
    misses a link that is in both the old and the new list: dropped entries
    are overwritten in place by added ones, survivors past the new end are
    copied into the remaining holes before the count shrinks. (Writing the new
    list front to back would hide survivors for a moment, and a node whose
    only in-links are being moved would briefly be unreachable.) Journaled."""
    _begin_rewrite(g, node, layer)
    cnt = _count(row)
    cap = row.shape[0] - 1
    added = 0
    hole = 1
    for i in range(n_new):  # new entries take the places of dropped ones
        x = new_v[i]
        if _contains(row, cnt, x):
            continue
        while hole <= cnt and _in(new_v, n_new, row[hole]):
            hole += 1
        if hole <= cnt:
            row[hole] = x
            hole += 1
        elif cnt + added < cap:
            added += 1
            row[cnt + added] = x
    if added:
        row[0] = _count_word(cnt + added, stable)
    else:
        j = n_new + 1
        for h in range(1, min(n_new, cnt) + 1):  # pull survivors past the new end into holes
            if not _in(new_v, n_new, row[h]):
                while j <= cnt and not _in(new_v, n_new, row[j]):
                    j += 1
                if j <= cnt:
                    row[h] = row[j]
                    j += 1
        row[0] = _count_word(min(n_new, cnt), stable)
    _end_rewrite(g)


@uncounted_kernel
def _count_word(cnt, stable):
    return np.int32(cnt | ((cnt if stable else 0) << STABLE_SHIFT))


@uncounted_kernel
def _begin_rewrite(g, node, layer):
    g.state[1] = ((np.int64(layer) << 32) | node) + 1
    fence()


@uncounted_kernel
def _end_rewrite(g):
    fence()
    g.state[1] = 0


@uncounted_kernel
def _add_link(store, g, src, dst, layer, max_links, metric, sc):
    """Add the edge src->dst; when src's list is full, keep its pinned edges and
    re-select the rest with the heuristic (reverse-link pruning), comparing
    its stable prefix only with the links added since; the result is
    stable."""
    row = _row(g, src, layer)
    if row.shape[0] == 0:
        return
    cnt = _count(row)
    if _contains(row, cnt, dst):
        return
    if cnt < max_links:
        row[cnt + 1] = dst
        row[0] = np.int32(cnt + 1) | (_stable(row, cnt) << STABLE_SHIFT)
        return
    s = _stable(row, cnt)
    # Candidates: current links plus dst, pinned ones kept outright.
    n_pinned = 0
    n_free = 0
    base = _insert_cues(store, sc.base, sc.base16)
    _load_cue(store, src, metric, base, 0)
    for t in range(cnt + 1):
        x = row[t + 1] if t < cnt else dst
        d = dist(store, x, base, 0, metric)
        fresh = np.int8(t >= s)
        if layer == 0 and _is_pinned(g, src, x):
            sc.keep_v[n_pinned] = x
            sc.keep_k[n_pinned] = d
            sc.keep_f[n_pinned] = fresh
            n_pinned += 1
        else:
            sc.tmp_v[n_free] = x
            sc.tmp_k[n_free] = d
            sc.tmp_f[n_free] = fresh
            n_free += 1
    _sort_by_key(sc.tmp_k, sc.tmp_v, sc.tmp_f, n_free)
    n_keep = _select(store, sc.tmp_k, sc.tmp_v, n_free, max_links, metric, sc.keep_k, sc.keep_v, n_pinned,
                     _insert_cues(store, sc.kept, sc.kept16), sc.tmp_f, sc.keep_f)
    _rewrite(g, src, layer, row, sc.keep_v, n_keep, True)


@uncounted_kernel
def _find_parent(g, node, n_cand, m, sc):
    """A parent for `node`: the nearest candidate (sc.res_v, ascending) with
    fewer than m pinned edges, so the pinned in-link comes from a node a search
    for `node` passes by; else the nearest such node by breadth-first walk from
    the closest candidate (one exists: a tree has fewer than two pinned edges
    per node on average)."""
    for i in range(n_cand):
        c = sc.res_v[i]
        if _pinned_count(g, c) < m:
            return c
    start = sc.res_v[0] if n_cand > 0 else 0
    tag = _next_tag(sc)
    sc.visited[start] = tag
    sc.cand_v[0] = start
    head = 0
    tail = 1
    while head < tail:
        c = sc.cand_v[head]
        head += 1
        if c != node and _pinned_count(g, c) < m:
            return c
        row = g.links0[c]
        for t in range(1, _count(row) + 1):
            x = row[t]
            if x >= 0 and x < sc.visited.shape[0] and sc.visited[x] != tag:
                sc.visited[x] = tag
                sc.cand_v[tail] = x
                tail += 1
    return -1


@uncounted_kernel
def _write_layer0(store, g, node, chosen, n_sel, n_cand, m, metric, sc, reverse):
    """Write node's layer-0 list: its pinned edges (kept across a re-insert), a
    parent if it has none, then the selected neighbours `chosen[:n_sel]`;
    with `reverse`, the parent's pinned link to node too."""
    row = g.links0[node]
    max_links = row.shape[0] - 1
    cnt = _count(row)
    n = 0
    for t in range(1, cnt + 1):
        x = row[t]
        if x >= 0 and _is_pinned(g, node, x) and not _in(sc.tmp_v, n, x) and n < max_links:
            sc.tmp_v[n] = x
            n += 1
    if g.parent[node] < 0 and node != 0:
        g.parent[node] = _find_parent(g, node, n_cand, m, sc)
    p = g.parent[node]
    if p >= 0 and not _in(sc.tmp_v, n, p) and n < max_links:
        sc.tmp_v[n] = p
        n += 1
    for i in range(n_sel):
        x = chosen[i]
        if n < max_links and not _in(sc.tmp_v, n, x):
            sc.tmp_v[n] = x
            n += 1
    _rewrite(g, node, 0, row, sc.tmp_v, n, False)
    if p >= 0 and reverse:
        _add_link(store, g, p, node, 0, max_links, metric, sc)


@uncounted_kernel
def _insert_one(store, gens, g, node, m, ef_c, metric, sc, reverse):
    q = _insert_cues(store, sc.qbuf, sc.qbuf16)
    _load_cue(store, node, metric, q, 0)
    node_level = g.level[node]
    entry = g.state[0]
    if entry < 0:
        g.state[0] = (np.int64(node_level) << 32) | node
        return
    ep = np.int32(entry & _LOW32)
    top = np.int32(entry >> 32)
    if ep == node:
        # A crashed attempt made this node the entry: start from the root instead.
        if node == 0:
            return
        ep = np.int32(0)
        top = g.level[0]
    ep_d = dist(store, ep, q, 0, metric)
    for layer in range(top, node_level, -1):
        ep, ep_d = _greedy(store, g, q, ep, ep_d, layer, metric)
    # Search every layer first (top down), then link bottom up: a reader that
    # meets the node on an upper layer always finds its layer-0 list complete.
    low = min(node_level, top)
    n = 0
    for layer in range(low, -1, -1):
        n = _search_layer(store, gens, g, q, ep, ep_d, ef_c, layer, metric,
                          store.shape[0], GEN_ANY, node, sc)
        heap_sort_ascending(sc.res_k, sc.res_v, n, sc.cand_k, sc.cand_v)  # the queue is spent
        for i in range(n):
            sc.res_k[i] = sc.cand_k[i]
            sc.res_v[i] = sc.cand_v[i]
        sc.layer_n[layer] = _select(store, sc.res_k, sc.res_v, n, m, metric, sc.layer_k[layer],
                                    sc.layer_v[layer], 0, _insert_cues(store, sc.kept, sc.kept16))
        if n > 0:
            ep = sc.res_v[0]
            ep_d = sc.res_k[0]
    for layer in range(0, low + 1):  # sc.res_* still hold the layer-0 candidates for the parent
        chosen = sc.layer_v[layer]
        if layer == 0:
            _write_layer0(store, g, node, chosen, sc.layer_n[0], n, m, metric, sc, reverse)
            max_links = g.links0.shape[1] - 1
        else:
            row = _row(g, node, layer)
            if row.shape[0] == 0:
                continue
            _rewrite(g, node, layer, row, chosen, sc.layer_n[layer], True)
            max_links = m
        if not reverse:  # test-only (faults.SKIP_REVERSE_LINKS): a broken graph
            continue
        for i in range(sc.layer_n[layer]):
            _add_link(store, g, chosen[i], node, layer, max_links, metric, sc)
    if node_level > top:
        g.state[0] = (np.int64(node_level) << 32) | node


@uncounted_kernel
def _repair(g, n_nodes, scratch_v):
    """Finish the list rewrite a killed writer left half done (journal in
    state[1]): keep its pinned edges (parent and children), then its other
    valid links, each once."""
    marker = g.state[1]
    if marker <= 0:
        return
    node = np.int32((marker - 1) & _LOW32)
    layer = np.int32((marker - 1) >> 32)
    if not 0 <= node < n_nodes:
        _end_rewrite(g)
        return
    row = _row(g, node, layer)
    if row.shape[0] > 0:
        max_links = row.shape[0] - 1
        n = 0
        if layer == 0:
            p = g.parent[node]
            if p >= 0:
                scratch_v[n] = p
                n += 1
            for x in range(n_nodes):
                if g.parent[x] == node and n < max_links:
                    scratch_v[n] = x
                    n += 1
        for t in range(1, _count(row) + 1):
            x = row[t]
            if 0 <= x < n_nodes and x != node and n < max_links and not _in(scratch_v, n, x):
                scratch_v[n] = x
                n += 1
        for t in range(n):
            row[t + 1] = scratch_v[t]
        row[0] = n
    _end_rewrite(g)


@uncounted_kernel
def _insert_range(store, gens, g, lo, hi, m, ef_c, metric, sc, reverse, yield_every, beacon):
    began, paused = monotonic_ns(), 0
    for node in range(lo, hi):
        _insert_one(store, gens, g, node, m, ef_c, metric, sc, reverse)
        paused = defer_to_recalls(beacon, began, paused)
        if yield_every > 0 and (node - lo + 1) % yield_every == 0:
            sched_yield()
    return paused


@uncounted_kernel
def _search_segment(store, gens, g, q, k, ef, n_indexed, scan_lo, scan_hi, gen_max, metric,
                    sc, out_d, out_i):
    """Top-k of one segment: HNSW over nodes [0, n_indexed), an exact scan of
    [scan_lo, scan_hi), both limited to generation <= gen_max. Writes ascending
    distances and node ids into out_d/out_i; returns how many."""
    q = _search_cue(store, q, sc.qbuf16)
    n_out = 0
    entry = g.state[0]
    if n_indexed > 0 and entry >= 0:
        ep = np.int32(entry & _LOW32)
        top = np.int32(entry >> 32)
        ep_d = dist(store, ep, q, 0, metric)
        for layer in range(top, 0, -1):
            ep, ep_d = _greedy(store, g, q, ep, ep_d, layer, metric)
        n = _search_layer(store, gens, g, q, ep, ep_d, max(ef, k), 0, metric,
                          n_indexed, gen_max, -1, sc)
        for i in range(n):
            n_out = topk_push(out_d, out_i, n_out, k, -sc.res_k[i], sc.res_v[i])
    chunk = sc.tmp_k.shape[0]
    node = scan_lo
    while node < scan_hi:  # the window's admitted rows, a chunk at a time
        n = 0
        while node < scan_hi and n < chunk:
            if gens[node] <= gen_max:
                sc.tmp_v[n] = node
                n += 1
            node += 1
        distances_of(store, sc.tmp_v, n, q, metric, sc.tmp_k)
        for t in range(n):
            n_out = topk_push(out_d, out_i, n_out, k, sc.tmp_k[t], sc.tmp_v[t])
    topk_finish(out_d, out_i, n_out)
    return n_out


@kernel
def _segment_at(table, s, like):
    """Segment s of a space table as arrays. They are writable views of memory
    the recall only reads (carray has no read-only form)."""
    row = table[s]
    cap = row[T_CAPACITY]
    width = row[T_WIDTH]
    store = carray(pointer_to(row[T_VECTORS], like.dtype), (cap, like.shape[1]))
    gens = carray(pointer_to(row[T_GENS], np.uint64), cap)
    header = carray(pointer_to(row[T_HEADER], np.int64), HEADER_WORDS)
    g = Graph(carray(pointer_to(row[T_LINKS0], np.int32), (cap, width)),
              carray(pointer_to(row[T_UPPER], np.int32), (row[T_UPPER_CAP], (width + 1) // 2)),
              carray(pointer_to(row[T_LEVEL], np.int32), cap),
              carray(pointer_to(row[T_UPPER_ROW], np.int32), cap),
              carray(pointer_to(row[T_PARENT], np.int32), cap),
              header[ENTRY:ENTRY + 2])
    return store, gens, g, header


@kernel
def _search_space(table, like, q, k, ef, gen_max, scan, metric, sc, seg_d, seg_i, out_d, out_ref):
    """Top-k over every segment of a space in one call: each segment's graph
    over its indexed nodes, and with `scan` an exact scan of its unindexed
    window, all limited to generation <= gen_max, merged as they come.
    `like` is an array of the store's dtype and dimension. Writes ascending
    distances and references (segment << 32 | slot) into out_d/out_ref;
    returns how many."""
    n_out = 0
    for s in range(table.shape[0]):
        store, gens, g, header = _segment_at(table, s, like)
        n_indexed = header[INDEXED]  # read before accepted: both only grow
        fence()
        n_accepted = header[ACCEPTED]
        fence()  # MAX_GEN after ACCEPTED: the front writes it first, so it covers those rows
        if n_accepted == 0 or np.uint64(header[MIN_GEN]) > gen_max:
            continue
        # A segment whose every row is in the snapshot (most: only rows
        # accepted during the recall are not) is searched without reading
        # each admitted node's generation, a cache miss apiece.
        seg_gen_max = GEN_ANY if np.uint64(header[MAX_GEN]) <= gen_max else gen_max
        lo = n_indexed if scan else 0
        hi = n_accepted if scan else 0
        n = _search_segment(store, gens, g, q, k, ef, n_indexed, lo, hi, seg_gen_max, metric,
                            sc, seg_d, seg_i)
        for i in range(n):
            n_out = topk_push(out_d, out_ref, n_out, k, seg_d[i], (np.int64(s) << 32) | seg_i[i])
    topk_finish(out_d, out_ref, n_out)
    return n_out


def new_graph(levels: np.ndarray, M: int, max_level: int) -> Graph:
    """A standalone empty graph for nodes with the given levels (capped at
    max_level), laid out as in a segment; for tests, benchmarks and warm-up."""
    cap = len(levels)
    levels = np.minimum(levels, max_level).astype(np.int32)
    return Graph(np.zeros((cap, 2 * M + 1), np.int32),
                 np.zeros((max(int(levels.sum()), 1), M + 1), np.int32),
                 levels, first_upper_rows(levels), np.full(cap, -1, np.int32), np.array([-1, 0], np.int64))


def new_scratch(capacity: int, dim: int, M: int, ef: int, max_level: int) -> Scratch:
    """Scratch for one thread working on segments of `capacity` nodes, with
    result heaps for beams up to `ef` and graphs of `max_level` upper layers."""
    small = 2 * M + 2
    cue16 = int16_cue_width(dim)
    return Scratch(
        visited=np.zeros(capacity, np.uint16), tag=np.zeros(1, np.int32),
        cand_k=np.empty(capacity, np.float32), cand_v=np.empty(capacity, np.int32),
        res_k=np.empty(ef + 1, np.float32), res_v=np.empty(ef + 1, np.int32),
        qbuf=np.empty((1, dim), np.float32),
        layer_k=np.empty((max_level + 1, M), np.float32), layer_v=np.empty((max_level + 1, M), np.int32),
        layer_n=np.zeros(max_level + 1, np.int32),
        keep_k=np.empty(small, np.float32), keep_v=np.empty(small, np.int32), keep_f=np.empty(small, np.int8),
        tmp_k=np.empty(small, np.float32), tmp_v=np.empty(small, np.int32), tmp_f=np.empty(small, np.int8),
        kept=np.empty((small, dim), np.float32), base=np.empty((1, dim), np.float32),
        qbuf16=np.zeros((1, cue16), np.int16), kept16=np.zeros((small, cue16), np.int16),
        base16=np.zeros((1, cue16), np.int16),
    )


class ScratchCache:
    """Scratch per graph shape for one thread, grown when a wider beam asks;
    made by `make(capacity, dim, M, ef, max_level)` (new_scratch, or the
    recall kernel's)."""

    def __init__(self, make=new_scratch):
        self._make = make
        self._by_shape: dict[tuple, tuple[int, object]] = {}

    def get(self, capacity: int, dim: int, M: int, ef: int, max_level: int):
        key = (capacity, dim, M, max_level)
        held = self._by_shape.get(key)
        if held is None or held[0] < ef:
            held = self._by_shape[key] = (ef, self._make(capacity, dim, M, ef, max_level))
        return held[1]


def _check_graph(store: np.ndarray, gens: np.ndarray, g: Graph, sc: Scratch) -> int:
    M = _check_columns(store, gens, g)
    cap = store.shape[0]
    if not (sc.visited.shape[0] >= cap and sc.cand_k.shape[0] >= cap and sc.keep_v.shape[0] >= 2 * M + 2
            and sc.layer_v.shape[0] > MAX_LEVEL and sc.layer_v.shape[1] >= M):
        raise InvalidArgument("scratch arrays do not match the store's capacity and M")
    return M


def _check_columns(store: np.ndarray, gens: np.ndarray, g: Graph) -> int:
    check_store(store)
    cap = store.shape[0]
    M = g.upper.shape[1] - 1
    ok = (gens.shape == (cap,) and gens.dtype == np.uint64 and g.upper.ndim == 2
          and g.links0.shape == (cap, 2 * M + 1) and g.links0.dtype == np.int32
          and g.level.shape == (cap,) and g.upper_row.shape == (cap,) and g.parent.shape == (cap,)
          and g.state.shape == (2,) and g.state.dtype == np.int64)
    if not ok:
        raise InvalidArgument("graph or generation arrays do not match the store's capacity and M")
    return M


class SpaceViews:
    """The segments of one space as the space kernel takes them: their table,
    checked once when built (segments never change shape), with the largest
    capacity (the scratch a search needs) and the dimension. It holds the
    views, so the memory stays mapped while it is in use."""

    def __init__(self, views: list[SegmentView]):
        if not views:
            raise InvalidArgument("a space view needs at least one segment")
        for v in views:
            _check_columns(v.store, v.gens, v.graph)
            if (v.header.shape != (HEADER_WORDS,) or v.header.dtype != np.int64
                    or not all(a.flags.c_contiguous for a in (v.header, *v.graph[:5]))
                    or v.graph.state.ctypes.data != v.header.ctypes.data + ENTRY * 8):
                raise InvalidArgument("segment columns are not laid out as a segment's (the graph's "
                                      "entry is the header's ENTRY words)")
        if len({(v.store.dtype, v.store.shape[1], v.graph.links0.shape[1]) for v in views}) != 1:
            raise InvalidArgument("the segments of a space share dtype, dimension and M")
        self.views = views
        self.table = np.array([[v.store.ctypes.data, v.gens.ctypes.data, v.graph.links0.ctypes.data,
                                v.graph.upper.ctypes.data, v.graph.level.ctypes.data,
                                v.graph.upper_row.ctypes.data, v.graph.parent.ctypes.data,
                                v.header.ctypes.data, v.store.shape[0], v.graph.upper.shape[0],
                                v.graph.links0.shape[1]] for v in views], np.int64)
        self.like = np.empty((0, views[0].store.shape[1]), views[0].store.dtype)
        self.capacity = max(v.store.shape[0] for v in views)
        self.dim = stored_dim(views[0].store)
        self.M = views[0].graph.upper.shape[1] - 1
        self.n = len(views)
        self._metric = None

    def metric(self, name: str, scales: np.ndarray | None):
        """The kernels' metric and its weights (policy.metric_of), worked out
        once: the segments of a space share their metric and scales, and
        this costs microseconds a recall would spend on every call."""
        cached = self._metric
        if cached is None or cached[0] != name or cached[1] is not scales:
            cached = self._metric = (name, scales, *metric_of(name, scales))
        return cached[2], cached[3]


_NO_BEACON = np.zeros(1, np.int64)  # never stamped: nothing to defer to


def insert(store, gens, g: Graph, lo: int, hi: int, ef_construction: int, metric: str,
           sc: Scratch, scales: np.ndarray | None = None, reverse: bool = True, yield_every: int = 0,
           beacon: np.ndarray | None = None) -> float:
    """Insert nodes [lo, hi) into the graph, in order. Nodes must have complete
    vectors, levels and upper rows; re-inserting a node is safe. `scales`:
    those of an int8 store's codes (policy.metric_of). `reverse=False` adds
    no reverse links: a broken graph, only for the chaos suite's deliberate
    bug (faults.py). `yield_every` > 0: give the CPU back (cpu.sched_yield)
    after every that many nodes, as an index worker does. `beacon`: the
    catalog's recall beacon (engine/beacon.py), deferred to after each node
    (cpu.defer_to_recalls). Returns the seconds spent deferring."""
    M = _check_graph(store, gens, g, sc)
    if not (0 <= lo <= hi <= store.shape[0]):
        raise InvalidArgument(f"insert range [{lo}, {hi}) is outside [0, {store.shape[0]}]")
    if not (1 <= ef_construction < sc.res_k.shape[0]) or sc.qbuf.shape[1] != stored_dim(store):
        raise InvalidArgument("scratch is too small for ef_construction or the dimension")
    kernel_metric, weights = metric_of(metric, scales)  # weights: referenced until the kernel returns
    return 1e-9 * _insert_range(store, gens, g, lo, hi, M, ef_construction, kernel_metric, sc, bool(reverse),
                                int(yield_every), _NO_BEACON if beacon is None else beacon)


def repair(g: Graph, n_nodes: int, sc: Scratch) -> bool:
    """Repair the list a killed writer was rewriting, if any; True if it did.
    Call before inserting into a graph another writer may have abandoned."""
    if g.state[1] == 0:
        return False
    if not 0 <= n_nodes <= g.links0.shape[0] or sc.tmp_v.shape[0] < g.links0.shape[1]:
        raise InvalidArgument("repair needs the node count and scratch of this graph")
    _repair(g, n_nodes, sc.tmp_v)
    return True


def search(store, gens, g: Graph, q: np.ndarray, k: int, ef: int, n_indexed: int,
           scan_lo: int, scan_hi: int, gen_max: int, metric: str, sc: Scratch,
           scales: np.ndarray | None = None):
    """Top-k (distances ascending, node ids) of one segment: graph search over
    [0, n_indexed) merged with an exact scan of [scan_lo, scan_hi), generation
    <= gen_max. Safe to call while a writer inserts."""
    _check_graph(store, gens, g, sc)
    check_query(q, stored_dim(store))
    cap = store.shape[0]
    if k < 1 or not (0 <= n_indexed <= cap and 0 <= scan_lo <= scan_hi <= cap):
        raise InvalidArgument("k must be >= 1 and counts within the segment")
    ef = max(ef, k)
    if sc.res_k.shape[0] <= ef:
        raise InvalidArgument(f"scratch holds ef < {sc.res_k.shape[0]}, asked {ef}")
    out_d = np.empty(k, np.float32)
    out_i = np.empty(k, np.int32)
    kernel_metric, weights = metric_of(metric, scales)  # weights: referenced until the kernel returns
    q = weighted_cue(q, kernel_metric, weights)
    n = _search_segment(store, gens, g, q.reshape(1, -1), k, ef, n_indexed, scan_lo, scan_hi,
                        np.uint64(gen_max), kernel_metric, sc, out_d, out_i)
    return out_d[:n], out_i[:n]


def search_space(views: SpaceViews, q: np.ndarray, k: int, ef: int, gen_max: int, scan: bool,
                 metric: str, sc: Scratch, scales: np.ndarray | None = None):
    """Top-k of a whole space (distances ascending, segment << 32 | slot
    references): `search` of every segment, with each one's counters read
    by the kernel, merged in the kernel. Safe to call while writers append
    and insert."""
    check_query(q, views.dim)
    ef = max(ef, k)
    if k < 1 or sc.res_k.shape[0] <= ef or sc.visited.shape[0] < views.capacity:
        raise InvalidArgument(f"k must be >= 1 and the scratch hold ef = {ef} and "
                              f"{views.capacity} nodes")
    out_d = np.empty(k, np.float32)
    out_ref = np.empty(k, np.int64)
    kernel_metric, weights = views.metric(metric, scales)  # views hold the weights
    q = weighted_cue(q, kernel_metric, weights)
    n = _search_space(views.table, views.like, q.reshape(1, -1), k, ef, np.uint64(gen_max), scan,
                      kernel_metric, sc, np.empty(k, np.float32), np.empty(k, np.int32),
                      out_d, out_ref)
    return out_d[:n], out_ref[:n]
