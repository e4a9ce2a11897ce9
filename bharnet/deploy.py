"""Deploy a trained model as a ``torch.export`` program: a file that runs without the model's
Python classes, batch size free.

* :func:`export` fuses an eval-mode model for inference (:func:`bharnet.fast.fuse_for_inference`:
  BatchNorm folded, the C++ kernels on CPU) and exports it with the batch dimension dynamic;
  with ``path`` it also saves the program (``torch.export.save``).
* :func:`load` reads a saved program back; its ``.module()`` is called like the model and
  returns the same :class:`bharnet.ModelOutput`.
* :func:`compile_package` compiles a program ahead of time (AOTInductor); :func:`load_package`
  loads the package.
* ``metadata`` (a JSON-able dict; ``bharnet export`` stores the checkpoint's description, whose
  ``modality``, ``window`` and ``preprocessing`` :func:`bharnet.data.clip_input` takes) travels
  in either file; :func:`read_metadata` reads it back.

The program calls bharnet's C++ ops (``torch.ops.bharnet.*``) where the fused model does, so
the process that loads it needs bharnet installed (:func:`load` registers the ops first); the
clip length T and the number of persons M are fixed at export, as in the model's input
normalisation (``data_bn``). Absent persons (all-zero inputs) are computed, not skipped: the
skip depends on the data (:mod:`bharnet.absent_persons`).
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .fast import fuse_for_inference
from .ops import register_cpp_ops

MAX_BATCH = 4096
METADATA_KEY = "bharnet.json"
INPUTS = ("body", "hand", "hand_valid")  # a program's inputs, in order (the first two, or all three)


def _with_inputs(metadata: Optional[dict], program: torch.export.ExportedProgram) -> str:
    """``metadata`` as stored: JSON, with the names of the program's ``inputs`` (what
    :class:`bharnet.stream.LiveRecognizer` passes it) where the program knows them."""
    metadata = dict(metadata or {})
    if program.example_inputs is not None:
        metadata["inputs"] = list(INPUTS[:len(program.example_inputs[0])])
    return json.dumps(metadata)


def export(model: nn.Module, body: Optional[torch.Tensor], hand: Optional[torch.Tensor],
           hand_valid: Optional[torch.Tensor] = None, path: Optional[str] = None, backend: Optional[str] = "auto",
           metadata: Optional[dict] = None) -> torch.export.ExportedProgram:
    """The program of ``model`` (an eval-mode model of :mod:`bharnet.models`, fused here for
    inference on ``backend``) traced on example inputs ``body`` (N, C, T, 25, M), ``hand``
    (N, C, T, 42, M) and ``hand_valid`` (N, T, 2, M) bool, any batch size 1 to ``MAX_BATCH`` at
    run time; saved to ``path`` if given, with ``metadata`` and the names of its ``inputs``.
    A single-modality model may take None for the input it does not read (the program then
    takes None there too). Without ``hand_valid`` the program takes ``(body, hand)`` and its
    attention attends every hand. A one-clip example is traced as two copies of the clip:
    torch.export would otherwise take the batch size 1 for a constant."""
    if model.training:
        raise ValueError("export takes an eval-mode model (call model.eval() first)")
    fused = fuse_for_inference(model, backend)
    inputs = tuple(x if x is None or x.shape[0] != 1 else x.expand(2, *x.shape[1:]).contiguous()
                   for x in (body, hand) + (() if hand_valid is None else (hand_valid,)))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(fused, inputs,
                                  dynamic_shapes=tuple(None if x is None else {0: batch} for x in inputs))
    if path is not None:
        torch.export.save(program, path, extra_files={METADATA_KEY: _with_inputs(metadata, program)})
    return program


def load(path: str) -> torch.export.ExportedProgram:
    """A program saved by :func:`export` (its C++ ops registered first)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path!r}")
    register_cpp_ops()
    return torch.export.load(path)


def compile_package(program: torch.export.ExportedProgram, path: str, metadata: Optional[dict] = None) -> str:
    """Compile ``program`` ahead of time with AOTInductor into the package ``path`` (``.pt2``):
    generated C++ for everything but bharnet's C++ ops, which it calls through PyTorch's
    dispatcher; no Python tracing or Inductor compilation when it is loaded. ``metadata`` is
    stored in the package, with the names of the program's ``inputs``. Returns ``path``."""
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"an AOTInductor package path must end in .pt2, got {path!r}")
    configs = {"aot_inductor.metadata": {METADATA_KEY: _with_inputs(metadata, program)}}
    return torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)


def load_package(path: str):
    """The callable of a package from :func:`compile_package` (its C++ ops registered first):
    ``load_package(path)(body, hand, hand_valid)`` returns a :class:`bharnet.ModelOutput`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no AOTInductor package at {path!r}")
    register_cpp_ops()
    return torch._inductor.aoti_load_package(path)


def _inspect(path: str) -> Tuple[str, Optional[dict]]:
    """What a file that :func:`export` or :func:`compile_package` saved holds, from one look at
    its zip entries: ``("program", metadata)`` (``{}`` for a program saved without any) or
    ``("package", None)`` (a package's metadata is read by loading it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path!r}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            entry = next((name for name in names if name.endswith(f"/extra/{METADATA_KEY}")), None)
            if entry is not None:
                return "program", json.loads(archive.read(entry) or "{}")
        if any("/data/aotinductor/" in name for name in names):
            return "package", None
        if any(name.endswith("/models/model.json") for name in names):  # a program saved without metadata
            return "program", {}
    raise ValueError(f"{path!r} is not a program or package saved by bharnet.deploy")


def _package_metadata(package) -> dict:
    return json.loads(package.get_metadata().get(METADATA_KEY, "{}"))


def read_metadata(path: str) -> dict:
    """The ``metadata`` saved with a program (:func:`export`) or a package
    (:func:`compile_package`) at ``path``; ``{}`` for a file saved without it."""
    kind, metadata = _inspect(path)
    return _package_metadata(load_package(path)) if kind == "package" else metadata


def load_runnable(path: str) -> Tuple[Callable, dict]:
    """Whatever ``path`` holds, a program (:func:`export`) or a package (:func:`compile_package`),
    as a callable ``(body, hand, hand_valid) -> ModelOutput`` (``(body, hand)`` for a file
    exported before bharnet passed ``hand_valid``: its metadata has no ``inputs``), with its
    metadata."""
    kind, metadata = _inspect(path)
    if kind == "package":
        package = load_package(path)
        return package, _package_metadata(package)
    return load(path).module(), metadata
