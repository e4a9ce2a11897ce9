"""A CTR-GCN for your own skeleton, built from bharnet's layers: COCO's 17 keypoints.

bharnet's graph convolution blocks work on any skeleton, not only NTU's 25 joints and the hands'
42 (beyond 128 joints ``auto`` passes over the Triton kernels). This example describes the 17 COCO keypoints of a 2D pose estimator as a
:class:`bharnet.graphs.Graph`, stacks :func:`bharnet.nn.make_blocks` into a classifier, trains
it for a few steps on the fused kernels (``auto``: C++ on CPU, Triton on a GPU), checks that
the pure-PyTorch reference computes the same, and fuses the trained model for inference.

    python examples/custom_skeleton.py              # CPU, about 6 s
    python examples/custom_skeleton.py --device cuda
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from bharnet.fast import fuse_for_inference, swap_layers
from bharnet.graphs import Graph
from bharnet.models.backbone import DataNorm
from bharnet.nn import global_pool, make_blocks
from bharnet.ops import resolve

# COCO keypoints: 0 nose, 1/2 eyes, 3/4 ears, 5/6 shoulders, 7/8 elbows, 9/10 wrists,
# 11/12 hips, 13/14 knees, 15/16 ankles (odd = left). (child, parent) edges towards the nose.
COCO = Graph("coco", 17, ((1, 0), (2, 0), (3, 1), (4, 2), (5, 0), (6, 0), (7, 5), (8, 6), (9, 7),
                          (10, 8), (11, 5), (12, 6), (13, 11), (14, 12), (15, 13), (16, 14)))


class SkeletonGCN(nn.Module):
    """(N, C, T, V, M) poses -> (N, classes) logits: input BatchNorm over (M, V, C), a stack of
    GCN blocks (an ST-GC input block, then CTR-GC blocks with multi-scale temporal
    convolutions), mean over time, joints and persons, linear classifier."""

    def __init__(self, graph: Graph, num_classes: int, in_channels: int = 3, num_person: int = 1,
                 channels=(32, 32, 64, 64), strides=(1, 1, 2, 1)):
        super().__init__()
        self.data_norm = DataNorm(in_channels, graph.num_nodes, num_person)  # -> (N * M, C, T, V)
        A = torch.from_numpy(graph.adjacency())  # (3, V, V): identity, inward, outward
        self.blocks = make_blocks(channels, strides, A, in_channels)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, M = x.shape[0], x.shape[4]
        pooled = global_pool(self.blocks(self.data_norm(x)))  # (N * M, channels[-1])
        return self.fc(pooled.view(N, M, -1).mean(dim=1))


def toy_batch(n: int, frames: int, device, seed: int = 0):
    """Random poses (x, y, confidence) whose class sets the sign of a slow sway of the wrists."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, frames, COCO.num_nodes, 1, generator=g) * 0.1
    labels = torch.randint(0, 2, (n,), generator=g)
    sway = torch.sin(torch.linspace(0, 3.1416, frames)) * (2 * labels[:, None] - 1)  # (n, T)
    x[:, 0, :, 9:11, 0] += sway[:, :, None]
    return x.to(device), labels.to(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--frames", type=int, default=32)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = SkeletonGCN(COCO, num_classes=2).to(device)
    swap_layers(model, "auto")  # the layers' default already; named here to show the switch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = toy_batch(16, args.frames, device)
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    backend = resolve("ctr_graph_conv", "auto", device.type)
    print(f"trained {args.steps} steps ({backend} kernels) in {time.perf_counter() - start:.1f} s: "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    model.eval()
    test_x, test_y = toy_batch(32, args.frames, device, seed=1)
    with torch.no_grad():
        fast = model(test_x)
        reference = swap_layers(model, "reference")(test_x)  # same weights, pure PyTorch
        swap_layers(model, "auto")
        fused = fuse_for_inference(model)(test_x)  # BatchNorms folded, C++ kernels on CPU
    scale = reference.abs().max().item()
    result = {
        "backend": backend,
        "losses": losses,
        "accuracy": (fast.argmax(1) == test_y).float().mean().item(),
        "fast_vs_reference": (fast - reference).abs().max().item() / scale,
        "fused_vs_reference": (fused - reference).abs().max().item() / scale,
    }
    print(f"held-out accuracy {100 * result['accuracy']:.1f}%; largest difference from the "
          f"reference, relative: auto {result['fast_vs_reference']:.1e}, "
          f"fused {result['fused_vs_reference']:.1e}")
    return result


if __name__ == "__main__":
    main()
