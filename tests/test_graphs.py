import numpy as np
import pytest
import torch

from bharnet.graphs import BODY, GRAPHS, HAND, HANDS, NTU_LEFT_WRIST, NTU_RIGHT_WRIST, UNIFIED, Graph, get_graph


@pytest.mark.parametrize("graph, nodes, edges", [(BODY, 25, 24), (HAND, 21, 20), (HANDS, 42, 40), (UNIFIED, 67, 66)])
def test_node_and_edge_counts(graph, nodes, edges):
    assert graph.num_nodes == nodes
    assert len(graph.inward) == edges
    assert len(set(graph.inward)) == edges
    assert all(0 <= c < nodes and 0 <= p < nodes and c != p for c, p in graph.inward)


@pytest.mark.parametrize("graph, components", [(BODY, 1), (HAND, 1), (HANDS, 2), (UNIFIED, 1)])
def test_graphs_are_forests_with_expected_components(graph, components):
    roots = [v for v, p in enumerate(graph.parents) if p == v]
    assert len(roots) == components  # a forest with V - E roots
    for v in range(graph.num_nodes):  # every node reaches a root without a cycle
        seen, node = set(), v
        while graph.parents[node] != node:
            assert node not in seen
            seen.add(node)
            node = graph.parents[node]


@pytest.mark.parametrize("graph", list(GRAPHS.values()), ids=list(GRAPHS))
def test_partitions(graph):
    A = graph.adjacency()
    assert A.shape == (3, graph.num_nodes, graph.num_nodes) and A.dtype == np.float32
    np.testing.assert_array_equal(A[0], np.eye(graph.num_nodes))
    inward = graph.edge_matrix(graph.inward)
    outward = graph.edge_matrix(graph.outward)
    np.testing.assert_array_equal(inward.T, outward)  # the two partitions are each other's transpose
    np.testing.assert_array_equal(inward + outward, (inward + outward).T)  # undirected skeleton symmetric
    for k in (1, 2):
        colsum = A[k].sum(axis=0)
        has_edges = (A[k] > 0).any(axis=0)
        np.testing.assert_allclose(colsum[has_edges], 1.0, rtol=1e-6)
        np.testing.assert_array_equal(colsum[~has_edges], 0.0)


def test_adjacency_row_is_output_joint():
    # NTU joint 4 (head, index 3) hangs off joint 3 (neck, index 2): inward flows child -> parent,
    # so row 2 (output = neck) has an entry in column 3 (input = head).
    A = BODY.adjacency()
    assert A[1, 2, 3] > 0 and A[1, 3, 2] == 0
    assert A[2, 3, 2] > 0 and A[2, 2, 3] == 0


def test_unified_links_hand_wrists_to_body_wrists():
    assert (25, NTU_LEFT_WRIST) in UNIFIED.inward
    assert (25 + 21, NTU_RIGHT_WRIST) in UNIFIED.inward
    assert BODY.parents[20] == 20  # spine shoulder is the body root


def test_unknown_graph_name():
    with pytest.raises(ValueError, match="unknown graph 'feet'"):
        get_graph("feet")


@pytest.mark.parametrize("num_nodes, inward, message", [
    (0, (), "num_nodes must be a positive int, got 0"),
    (2.0, (), "num_nodes must be a positive int"),
    (3, ((1, 0), (2, 3)), r"\(child, parent\) pair of joints in \[0, 3\), got \(2, 3\)"),
    (3, ((1, -1),), r"got \(1, -1\)"),
    (3, ((1, 0, 2),), "pair"),
    (3, (1, 0), "pair of joints in .*, got 1"),
    (3, ((1, 1),), "joint 1 is its own parent"),
    (3, ((1.0, 0),), r"got \(1.0, 0\)"),
    (3, ((True, 0),), r"got \(True, 0\)"),
    (3, ((1, 0), (1, 2)), "joint 1 has two parents"),
    (4, ((1, 2), (2, 3), (3, 1)), "form a cycle"),
])
def test_a_graph_that_is_not_a_skeleton_is_refused(num_nodes, inward, message):
    with pytest.raises(ValueError, match=message):
        Graph("custom", num_nodes, inward)


def test_a_custom_graph_takes_numpy_and_torch_integers_as_ints():
    graph = Graph("custom", np.int64(4), np.array([[1, 0], [2, 1], [3, 1]]))
    assert graph.num_nodes == 4 and type(graph.num_nodes) is int
    assert graph.inward == ((1, 0), (2, 1), (3, 1)) and all(type(j) is int for e in graph.inward for j in e)
    assert graph.parents.tolist() == [0, 0, 1, 1]
    A = graph.adjacency()
    assert A[1, 0, 1] == 1.0 and A[2, 1, 0] == 1.0  # inward: child 1 -> parent 0; outward: 0 -> 1
    assert Graph("custom", torch.tensor(4), torch.tensor([[1, 0], [2, 1], [3, 1]])) == graph
    assert Graph("custom", 4, ((1, 0), (2, 1), (1, 0), (3, 1))) == graph  # an edge given twice is one
