"""Multi-label Potts energies on a graph and their minimisation by alpha-expansion.

E(y) = sum_i U[i, y_i] + sum_(i,j) w_ij [y_i != y_j], with unaries U (S, K) that may be
``inf`` (a forbidden label, e.g. ScribbleSup's scribble constraint) and non-negative edge
weights w (E,). Alpha-expansion (Boykov, Veksler & Zabih, PAMI 2001, Sec. 3) visits each
label alpha in turn and lets every node either keep its label or switch to alpha, choosing
the best such *expansion move* exactly with one s-t min cut (PyMaxflow); it stops when no
move lowers the energy. For Potts the result is within a factor 2 of the optimum
(Theorem 6.1 there, c = 1) and, with two labels, the single move is the exact optimum.
"""

from __future__ import annotations

import maxflow
import numpy as np


def _check(unary: np.ndarray, edges: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    unary = np.asarray(unary, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if unary.ndim != 2 or unary.shape[1] < 1:
        raise ValueError(f"unary must be (S, K) costs, got shape {unary.shape}")
    if len(edges) != len(weights):
        raise ValueError(f"{len(edges)} edges but {len(weights)} weights; give one weight per edge")
    if len(edges) and (edges.min() < 0 or edges.max() >= len(unary)):
        raise ValueError(f"edges must join nodes 0..{len(unary) - 1}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("edge weights must be finite and >= 0 (Potts with w >= 0 is what expansion moves solve)")
    if np.isnan(unary).any() or (unary == -np.inf).any():
        raise ValueError("unary costs must be numbers or +inf (forbidden label), not NaN or -inf")
    return unary, edges, weights


def potts_energy(labels: np.ndarray, unary: np.ndarray, edges: np.ndarray, weights: np.ndarray) -> float:
    """E(y) = sum_i U[i, y_i] + sum_(i,j) w_ij [y_i != y_j] for labels (S,); inf if a label is forbidden."""
    unary, edges, weights = _check(unary, edges, weights)
    labels = np.asarray(labels, dtype=np.int64)
    data = unary[np.arange(len(unary)), labels].sum()
    return float(data + weights[labels[edges[:, 0]] != labels[edges[:, 1]]].sum())


def _expansion_move(labels: np.ndarray, alpha: int, unary: np.ndarray, edges: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The best labelling reachable from ``labels`` by one alpha-expansion (exact, by min cut).

    Binary variable x_i = 1 means "switch to alpha". Each Potts edge term E(x_i, x_j) with
    A = E(0,0), B = E(0,1), C = E(1,0), D = E(1,1) is split as
    A + (C - A) x_i + (D - C) x_j + (B + C - A - D)(1 - x_i) x_j (Kolmogorov & Zabih, PAMI
    2004); B + C - A - D >= 0 since Potts is a metric, so the last term is a cut edge i -> j.
    """
    s = len(labels)
    keep = unary[np.arange(s), labels]
    switch = unary[:, alpha].copy()
    finite = np.isfinite(unary)
    big = np.abs(unary[finite]).sum() + weights.sum() + 1.0  # stands in for inf: never worth paying
    switch[~np.isfinite(switch)] = big
    cost0, cost1 = keep.copy(), switch
    i, j = edges[:, 0], edges[:, 1]
    li, lj = labels[i], labels[j]
    a = weights * (li != lj)
    b = weights * (li != alpha)
    c = weights * (alpha != lj)
    np.add.at(cost1, i, c - a)
    np.add.at(cost1, j, -c)  # D - C with D = 0
    pair = b + c - a  # >= 0
    shift = np.minimum(cost0, cost1)
    graph = maxflow.Graph[float]()
    nodes = graph.add_nodes(s)
    # Source side = segment 0 = keep (pays cost0 through the sink edge); sink side = switch.
    graph.add_grid_tedges(nodes, cost1 - shift, cost0 - shift)
    if len(edges):
        graph.add_edges(nodes[i], nodes[j], pair, np.zeros_like(pair))
    graph.maxflow()
    switched = graph.get_grid_segments(nodes).astype(bool)
    return np.where(switched, alpha, labels)


def alpha_expansion(
    unary: np.ndarray,
    edges: np.ndarray,
    weights: np.ndarray,
    labels: np.ndarray | None = None,
    max_sweeps: int = 10,
) -> np.ndarray:
    """Minimise the Potts energy by alpha-expansion; returns labels (S,) of finite energy.

    Args:
        unary: (S, K) costs, ``inf`` where a label is forbidden; every row needs a finite entry.
        edges: (E, 2) node pairs.
        weights: (E,) Potts weights, >= 0.
        labels: Start labelling (S,) of finite energy; default: each node's cheapest label.
        max_sweeps: Upper bound on passes over all labels (it usually converges in 2-3).
    """
    unary, edges, weights = _check(unary, edges, weights)
    if not np.isfinite(unary).any(1).all():
        node = int(np.flatnonzero(~np.isfinite(unary).any(1))[0])
        raise ValueError(f"node {node} has no allowed label (all unary costs inf); relax its constraint")
    labels = unary.argmin(1) if labels is None else np.asarray(labels, dtype=np.int64).copy()
    energy = potts_energy(labels, unary, edges, weights)
    if not np.isfinite(energy):
        raise ValueError("the start labelling uses a forbidden label; start from one of finite energy")
    for _ in range(max_sweeps):
        improved = False
        for alpha in range(unary.shape[1]):
            proposal = _expansion_move(labels, alpha, unary, edges, weights)
            new = potts_energy(proposal, unary, edges, weights)
            if new < energy - 1e-9 * max(1.0, abs(energy)):
                labels, energy, improved = proposal, new, True
        if not improved:
            break
    return labels
