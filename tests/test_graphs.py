import numpy as np
import pytest

from bharnet.graphs import BODY, GRAPHS, HAND, HANDS, NTU_LEFT_WRIST, NTU_RIGHT_WRIST, UNIFIED, get_graph


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
