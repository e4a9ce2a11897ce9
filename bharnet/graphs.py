"""Skeleton graphs and their adjacency partitions.

Graphs: ``body`` (NTU RGB+D, 25 Kinect v2 joints), ``hand`` (one MediaPipe/OpenPose hand, 21
keypoints), ``hands`` (two hands, 42 nodes: left 0-20, right 21-41, two components) and
``unified`` (body 0-24 then both hands 25-66, each hand's wrist linked to the Kinect wrist).

Adjacency convention (DESIGN.md): row ``i`` is the output joint, ``y_i = sum_j A[i, j] x_j``.
Partitions (the CTR-GCN "spatial" strategy), stacked as ``A`` of shape (3, V, V):

* ``A[0] = I``
* ``A[1] = M_in · D_in^-1``: ``M_in[parent, child] = 1`` for every edge, column-normalised,
  so information flows inward (towards the root);
* ``A[2] = M_out · D_out^-1``: ``M_out = M_in^T``, column-normalised, flowing outward.

Column ``j`` of a partition is divided by its column sum (columns of zeros stay zero).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Tuple

import numpy as np

# NTU RGB+D joints, 1-based (child, parent) pairs towards the spine-shoulder joint 21.
_NTU_INWARD_1BASED = (
    (1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9),
    (11, 10), (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18),
    (20, 19), (22, 23), (23, 8), (24, 25), (25, 12),
)
NTU_LEFT_WRIST, NTU_RIGHT_WRIST = 6, 10  # 0-based (Kinect joints 7 and 11)

# MediaPipe hand keypoints: 0 wrist; thumb 1-4, index 5-8, middle 9-12, ring 13-16, pinky 17-20.
_HAND_INWARD = tuple((base + i + 1, base + i if i else 0)
                     for base in (0, 4, 8, 12, 16) for i in range(4))
HAND_NODES = 21


@dataclass(frozen=True)
class Graph:
    """A skeleton as a forest: ``inward`` holds 0-based (child, parent) edges."""

    name: str
    num_nodes: int
    inward: Tuple[Tuple[int, int], ...]

    def __post_init__(self):
        num_nodes = _joint_index(self.num_nodes)
        if num_nodes is None or num_nodes < 1:
            raise ValueError(f"graph {self.name!r}: num_nodes must be a positive int, got {self.num_nodes!r}")
        object.__setattr__(self, "num_nodes", num_nodes)
        edges = []
        for edge in self.inward:
            try:
                pair = tuple(_joint_index(j) for j in edge)
            except TypeError:  # not a pair of anything
                pair = ()
            if len(pair) != 2 or not all(j is not None and 0 <= j < num_nodes for j in pair):
                raise ValueError(f"graph {self.name!r}: an edge is a (child, parent) pair of joints in "
                                 f"[0, {num_nodes}), got {edge!r}")
            if pair not in edges:  # an edge given twice is one edge
                edges.append(pair)
        object.__setattr__(self, "inward", tuple(edges))
        parent_of = {}
        for child, parent in edges:
            if child == parent:
                raise ValueError(f"graph {self.name!r}: joint {child} is its own parent (the identity "
                                 "partition already links every joint to itself)")
            if child in parent_of:
                raise ValueError(f"graph {self.name!r}: joint {child} has two parents; a skeleton is a "
                                 "forest, each joint with at most one parent")
            parent_of[child] = parent
        for start in parent_of:  # every chain of parents must end at a root
            seen, joint = {start}, parent_of[start]
            while joint in parent_of:
                if joint in seen:
                    raise ValueError(f"graph {self.name!r}: the parents of joint {start} form a cycle "
                                     f"through joint {joint}; a skeleton is a forest")
                seen.add(joint)
                joint = parent_of[joint]

    @property
    def outward(self) -> Tuple[Tuple[int, int], ...]:
        return tuple((p, c) for c, p in self.inward)

    @property
    def parents(self) -> np.ndarray:
        """``parents[v]`` is v's parent; a root is its own parent (its bone is zero)."""
        parents = np.arange(self.num_nodes, dtype=np.int64)
        for child, parent in self.inward:
            parents[child] = parent
        return parents

    def edge_matrix(self, edges) -> np.ndarray:
        """``M[j_target, i_source] = 1`` for each (source, target) edge: row = output joint."""
        m = np.zeros((self.num_nodes, self.num_nodes), dtype=np.float32)
        for source, target in edges:
            m[target, source] = 1.0
        return m

    def adjacency(self) -> np.ndarray:
        """The (3, V, V) float32 partitions: identity, inward, outward (column-normalised)."""
        eye = np.eye(self.num_nodes, dtype=np.float32)
        return np.stack([eye, normalize_columns(self.edge_matrix(self.inward)),
                         normalize_columns(self.edge_matrix(self.outward))])


def _joint_index(value):
    """``value`` as a Python int if it is an integer (int, NumPy or one-element torch integer), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def normalize_columns(m: np.ndarray) -> np.ndarray:
    """``m · diag(1 / colsum)``, leaving all-zero columns at zero."""
    colsum = m.sum(axis=0)
    scale = np.where(colsum > 0, 1.0 / np.where(colsum > 0, colsum, 1.0), 0.0)
    return (m * scale[None, :]).astype(np.float32)


def _shift(edges, offset):
    return tuple((c + offset, p + offset) for c, p in edges)


BODY = Graph("body", 25, tuple((c - 1, p - 1) for c, p in _NTU_INWARD_1BASED))
HAND = Graph("hand", HAND_NODES, _HAND_INWARD)
HANDS = Graph("hands", 2 * HAND_NODES, _HAND_INWARD + _shift(_HAND_INWARD, HAND_NODES))
UNIFIED = Graph(
    "unified", 25 + 2 * HAND_NODES,
    BODY.inward + _shift(HANDS.inward, 25)
    + ((25, NTU_LEFT_WRIST), (25 + HAND_NODES, NTU_RIGHT_WRIST)),
)
GRAPHS = {g.name: g for g in (BODY, HAND, HANDS, UNIFIED)}


def get_graph(name: str) -> Graph:
    """Look a graph up by name: ``body``, ``hand``, ``hands`` or ``unified``."""
    try:
        return GRAPHS[name]
    except KeyError:
        raise ValueError(f"unknown graph {name!r}; expected one of {sorted(GRAPHS)}") from None
