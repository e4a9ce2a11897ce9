"""Convert NTU RGB+D ``.skeleton`` files (and optional hand files) into a prepared dataset.

Output: the format of :mod:`bharnet.data.dataset` (padded float32 memmaps + manifest).
Per sample: parse (:func:`bharnet.data.ntu.read_skeleton`), skip empty files (no body in
any frame) and those on the user's missing-skeleton list, keep the two most active
non-noise bodies (:func:`bharnet.data.ntu.select_bodies`), attach hands
(:mod:`bharnet.data.hands`: ``<name>.npz`` is preferred over ``<name>.json`` in
``hands_dir``), drop the frames where no kept body is present, and resample samples longer
than ``max_frames`` to ``max_frames`` by nearest frame.

Resumable and atomic: each converted sample is first saved to ``out_dir/.cache-<options>/``
(written under a temporary name, then ``os.replace``), so an interrupted run resumes where
it stopped; the split arrays are written under ``.partial`` names and renamed, and
``manifest.json`` is written last and removed first when rewriting. A run whose inputs
and options match the existing manifest does nothing. The cache is deleted on success.
"""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from . import hands as hands_io
from . import ntu
from .dataset import (NUM_PERSONS, SPLITS, SplitWriter, exclusive, invalidate, read_manifest,
                      remove_partial_files, split_summary, write_manifest)

SKIP_REASONS = ("malformed", "empty", "listed_missing", "bad_name")


@dataclass(frozen=True)
class PrepareOptions:
    """Per-sample conversion options (they key the resume cache)."""

    max_frames: int = 300
    min_body_frames: int = ntu.MIN_BODY_FRAMES
    with_hands: bool = False
    handedness: str = "nearest"
    hand_space: str = "camera"
    hand_max_distance: Optional[float] = None
    hand_min_score: float = 0.0

    def __post_init__(self):
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.handedness not in hands_io.HANDEDNESS_MODES:
            raise ValueError(f"handedness must be one of {hands_io.HANDEDNESS_MODES}, "
                             f"got {self.handedness!r}")
        if self.hand_space not in ("camera", "color"):
            raise ValueError(f"hand_space must be 'camera' or 'color', got {self.hand_space!r}")

    def fingerprint(self) -> str:
        return _digest({**asdict(self), "conversion": CONVERSION_VERSION})


# the per-sample conversion's version, in the cache's fingerprint and the manifest's source, so
# that a dataset prepared by an older conversion is converted again (2: the successive bodies of
# one actor are joined, ntu.assign_actors; 3: the hand_frames_differ note)
CONVERSION_VERSION = 3


@dataclass(frozen=True)
class SampleTask:
    """One sample to convert: its files, where its result is cached, and a stamp of its inputs."""

    name: str
    skeleton_path: str
    hand_path: Optional[str]
    cache_path: str
    stamp: str


@dataclass
class PrepareSummary:
    """What :func:`prepare_ntu` did: samples per split, samples left out (by reason: one of
    :data:`SKIP_REASONS`), error messages, notes (``resampled``, ``no_hand_file``,
    ``invalid_hand_file``, ``joined_bodies``, ``hand_frames_differ``: samples kept with a
    remark) and the work done in this run."""

    out_dir: str
    counts: Dict[str, int]
    skipped: Dict[str, List[str]]
    errors: Dict[str, str]
    notes: Dict[str, List[str]]
    outside_benchmark: int
    converted: int = 0
    resumed: int = 0
    up_to_date: bool = False

    def report(self) -> str:
        lines = [f"dataset: {self.out_dir}"
                 + (" (up to date, nothing to do)" if self.up_to_date else "")]
        lines.append("samples: " + ", ".join(f"{s} {n}" for s, n in self.counts.items()))
        if not self.up_to_date:
            lines.append(f"converted {self.converted}, resumed from cache {self.resumed}")
        if self.outside_benchmark:
            lines.append(f"not in this benchmark: {self.outside_benchmark}")
        for title, groups in (("skipped", self.skipped), ("kept with notes", self.notes)):
            for key, names in groups.items():
                if names:
                    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
                    lines.append(f"{title} ({key}): {len(names)}: {shown}")
        for name, message in list(self.errors.items())[:5]:
            lines.append(f"  {name}: {message}")
        return "\n".join(lines)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _stamp(path: Optional[str]) -> str:
    if path is None:
        return "-"
    info = os.stat(path)
    return f"{info.st_size}:{info.st_mtime_ns}"


def _save_atomically(path: str, **arrays) -> None:
    partial = path + ".partial.npz"
    try:
        np.savez(partial, **arrays)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


# --------------------------------------------------------------------------- one sample

def _note_frame_counts(hand_frames: int, skeleton_frames: int, notes: dict) -> None:
    """A hand file of another length is resampled to the skeleton's frames; say so (a detector
    run cut short, or the file of another sample, looks the same afterwards)."""
    if hand_frames != skeleton_frames:
        notes["hand_frames_differ"] = f"{hand_frames} hand frames for {skeleton_frames} skeleton frames"


def _sample_hands(task: SampleTask, skeleton: ntu.Skeleton, owner: np.ndarray,
                  options: PrepareOptions, notes: dict) -> hands_io.HandSequence:
    """The hands of the actors of ``owner`` (:func:`bharnet.data.ntu.assign_actors`), all frames."""
    frames, actors = owner.shape
    if task.hand_path is None:
        if options.with_hands:
            notes["no_hand_file"] = True
        return hands_io.HandSequence.empty(frames, actors)
    try:
        if task.hand_path.endswith(".npz"):  # a person per Kinect body
            by_body = hands_io.read_hand_npz(task.hand_path)
            _note_frame_counts(by_body.num_frames, frames, notes)
            by_body = by_body.with_persons(skeleton.num_bodies).with_frames(frames)
            return hands_io.HandSequence(ntu.gather_actors(by_body.keypoints, owner),
                                         ntu.gather_actors(by_body.valid, owner))
        space = skeleton.xyz if options.hand_space == "camera" else skeleton.color_xy
        detections = hands_io.read_mediapipe_json(task.hand_path)
        _note_frame_counts(len(detections), frames, notes)
        return hands_io.align_hands(
            detections, hands_io.kinect_wrists(ntu.gather_actors(space, owner)), owner >= 0,
            options.handedness, options.hand_max_distance, options.hand_min_score)
    except (OSError, ValueError, KeyError) as error:
        notes["invalid_hand_file"] = f"{task.hand_path}: {error}"
        return hands_io.HandSequence.empty(frames, actors)


def convert_sample(task: SampleTask, options: PrepareOptions) -> dict:
    """Convert one sample; returns ``{"status": "ok", "body", "hand", "hand_valid", "notes"}``
    (arrays in the dataset layout, length <= max_frames) or ``{"status": "skip", "reason",
    "message"}``."""
    try:
        skeleton = ntu.read_skeleton(task.skeleton_path)
    except ntu.SkeletonFormatError as error:
        return {"status": "skip", "reason": "malformed", "message": str(error)}
    if skeleton.is_empty:
        return {"status": "skip", "reason": "empty", "message": "no body in any frame"}
    owner = ntu.assign_actors(skeleton, NUM_PERSONS, options.min_body_frames)
    notes: dict = {}
    joined = sum(len(np.unique(column[column >= 0])) - 1 for column in owner.T)
    if joined:
        notes["joined_bodies"] = joined  # bodies that continue an actor under a new Kinect id
    hands = _sample_hands(task, skeleton, owner, options, notes)
    frames = np.flatnonzero((owner >= 0).any(axis=1))
    if len(frames) > options.max_frames:
        frames = frames[hands_io.resample_indices(len(frames), options.max_frames)]
        notes["resampled"] = True
    body = np.zeros((len(frames), NUM_PERSONS, ntu.NUM_JOINTS, 3), np.float32)
    body[:, :owner.shape[1]] = ntu.gather_actors(skeleton.xyz, owner)[frames]
    hand, hand_valid = hands.select(frames=frames).with_persons(NUM_PERSONS).graph_arrays()
    return {"status": "ok", "body": np.ascontiguousarray(body.transpose(3, 0, 2, 1)),
            "hand": hand, "hand_valid": hand_valid, "notes": notes}


def process_sample(task: SampleTask, options: PrepareOptions) -> str:
    """Worker entry point: convert ``task`` and cache the result atomically; returns the name."""
    result = convert_sample(task, options)
    meta = {key: value for key, value in result.items()
            if key not in ("body", "hand", "hand_valid")}
    meta["stamp"] = task.stamp
    arrays = {key: result[key] for key in ("body", "hand", "hand_valid") if key in result}
    _save_atomically(task.cache_path, meta=np.array(json.dumps(meta)), **arrays)
    return task.name


def _cached_meta(task: SampleTask) -> Optional[dict]:
    """The cached result's metadata when it exists and matches the task's inputs."""
    if not os.path.exists(task.cache_path):
        return None
    try:
        with np.load(task.cache_path) as data:
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # unreadable: convert again
        return None
    return meta if meta.get("stamp") == task.stamp else None


# --------------------------------------------------------------------------- the whole folder

def _hand_file(hands_dir: Optional[str], name: str) -> Optional[str]:
    if hands_dir is None:
        return None
    for extension in (".npz", ".json"):
        path = os.path.join(hands_dir, name + extension)
        if os.path.exists(path):
            return path
    return None


def _skeleton_files(src_dir: str) -> Dict[str, str]:
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"src_dir {src_dir!r} is not a directory")
    files: Dict[str, str] = {}
    for folder, _, names in os.walk(src_dir):
        for file in names:
            if file.endswith(".skeleton"):
                name = file[:-len(".skeleton")]
                if name in files:
                    raise ValueError(f"sample {name!r} appears twice: {files[name]} and "
                                     f"{os.path.join(folder, file)}")
                files[name] = os.path.join(folder, file)
    if not files:
        raise FileNotFoundError(f"no .skeleton files under {src_dir!r}")
    return dict(sorted(files.items()))


def prepare_ntu(src_dir: str, out_dir: str, hands_dir: Optional[str] = None,
                benchmark: str = "xsub60", workers: Optional[int] = None,
                max_frames: int = 300, missing_skeleton=None, min_body_frames: int = ntu.MIN_BODY_FRAMES,
                handedness: str = "nearest", hand_space: str = "camera",
                hand_max_distance: Optional[float] = None, hand_min_score: float = 0.0,
                hand_centric_classes: Sequence[int] = (), progress: bool = True
                ) -> PrepareSummary:
    """Prepare NTU RGB+D ``.skeleton`` files under ``src_dir`` (searched recursively) as a
    dataset in ``out_dir`` for ``benchmark`` (one of :data:`bharnet.data.ntu.BENCHMARKS`).

    ``missing_skeleton``: None, a path to a list of sample names or an iterable of names
    to skip (see :func:`bharnet.data.ntu.load_missing_skeletons`); files without any body
    are skipped anyway. ``workers``: processes for conversion (default: all CPUs; 0 or 1
    converts in this process). ``hand_centric_classes``: 0-based class indices recorded in
    the manifest (a run that changes only these rewrites the manifest and converts nothing). The hand options are those of :func:`bharnet.data.hands.align_hands`;
    ``hand_space`` says whether JSON hands are in camera metres or colour-image pixels.
    """
    # the arguments are checked before the lock creates out_dir: a mistake leaves nothing behind
    ntu.check_benchmark(benchmark)
    files = _skeleton_files(src_dir)
    if hands_dir is not None and not os.path.isdir(hands_dir):
        raise FileNotFoundError(f"hands_dir {hands_dir!r} is not a directory")
    num_classes = ntu.benchmark_num_classes(benchmark)
    hand_centric = sorted({int(c) for c in hand_centric_classes})
    if any(not 0 <= c < num_classes for c in hand_centric):
        raise ValueError(f"hand_centric_classes must be class indices in [0, {num_classes}), "
                         f"got {hand_centric}")
    options = PrepareOptions(max_frames, min_body_frames, hands_dir is not None, handedness,
                             hand_space, hand_max_distance, hand_min_score)
    listed_missing = ntu.missing_skeleton_names(missing_skeleton)
    with exclusive(out_dir):  # one writer; a second run into the same folder waits, then finds it done
        return _prepare_ntu(src_dir, files, out_dir, hands_dir, benchmark, workers, options, listed_missing,
                            hand_centric, progress)


def _prepare_ntu(src_dir, files, out_dir, hands_dir, benchmark, workers, options, listed_missing, hand_centric,
                 progress) -> PrepareSummary:
    """The body of :func:`prepare_ntu`, under its lock."""
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    num_classes = ntu.benchmark_num_classes(benchmark)
    skipped: Dict[str, List[str]] = {reason: [] for reason in SKIP_REASONS}
    cache_dir = os.path.join(out_dir, f".cache-{options.fingerprint()[:16]}")
    tasks, splits, outside = [], {}, 0
    for name, path in files.items():
        try:
            sample = ntu.SampleName.parse(name)
        except ValueError:
            skipped["bad_name"].append(name)
            continue
        if str(sample) != name:  # e.g. a copy "S001C001P001R001A001.orig" of a sample
            skipped["bad_name"].append(name)
            continue
        split = ntu.benchmark_split(sample, benchmark)
        if split is None:
            outside += 1
        elif str(sample) in listed_missing:
            skipped["listed_missing"].append(name)
        else:
            hand_path = _hand_file(hands_dir, name)
            tasks.append(SampleTask(name, path, hand_path, os.path.join(cache_dir, name + ".npz"),
                                    f"{_stamp(path)}/{_stamp(hand_path)}"))
            splits[name] = split
    source = {"kind": "ntu", "benchmark": benchmark, "src_dir": os.path.abspath(src_dir),
              "hands_dir": None if hands_dir is None else os.path.abspath(hands_dir),
              "options": asdict(options), "missing_skeleton_list": len(listed_missing),
              "inputs": _digest([(t.name, t.stamp) for t in tasks]),
              "hand_centric_classes": hand_centric, "conversion": CONVERSION_VERSION}
    summary = _summary_if_up_to_date(out_dir, source)
    if summary is not None:
        return summary
    summary = _relabelled_hand_centric_classes(out_dir, source)
    if summary is not None:
        return summary

    os.makedirs(cache_dir, exist_ok=True)
    remove_partial_files(out_dir)
    pending = [task for task in tasks if _cached_meta(task) is None]
    _convert_all(pending, options, workers, progress)

    results = {"train": [], "test": []}
    errors: Dict[str, str] = {}
    notes: Dict[str, List[str]] = {"resampled": [], "no_hand_file": [], "invalid_hand_file": [], "joined_bodies": [],
                                   "hand_frames_differ": []}
    for task in tasks:
        meta = _cached_meta(task)
        if meta is None:
            raise RuntimeError(f"conversion of {task.name} left no result in {task.cache_path}")
        if meta["status"] == "skip":
            skipped[meta["reason"]].append(task.name)
            if meta["reason"] == "malformed":
                errors[task.name] = meta["message"]
            continue
        for note, value in meta["notes"].items():
            notes[note].append(task.name)
            if note == "invalid_hand_file":
                errors[task.name] = value
        results[splits[task.name]].append(task)

    invalidate(out_dir)
    labels = {}
    for split in SPLITS:
        labels[split] = _write_split(os.path.join(out_dir, split), results[split], options.max_frames)
    write_manifest(out_dir, {
        "num_classes": num_classes,
        "class_names": list(ntu.NTU_CLASS_NAMES[:num_classes]),
        "hand_centric_classes": hand_centric,
        "max_frames": options.max_frames, "num_persons": NUM_PERSONS,
        "hand_space": options.hand_space, "has_hands": hands_dir is not None,
        "splits": {split: split_summary(labels[split], num_classes) for split in SPLITS},
        "source": source, "skipped": skipped, "outside_benchmark": outside,
        "notes": notes, "errors": errors,
    })
    for stale in glob.glob(os.path.join(glob.escape(out_dir), ".cache-*")):  # this run's, and other options' runs
        shutil.rmtree(stale, ignore_errors=True)
    return PrepareSummary(out_dir, {s: len(results[s]) for s in SPLITS}, skipped, errors, notes,
                          outside, converted=len(pending), resumed=len(tasks) - len(pending))


def _summary_if_up_to_date(out_dir: str, source: dict) -> Optional[PrepareSummary]:
    try:
        manifest = read_manifest(out_dir)
    except (FileNotFoundError, ValueError):
        return None
    if manifest.get("source") != json.loads(json.dumps(source)):
        return None
    return _up_to_date_summary(out_dir, manifest)


def _up_to_date_summary(out_dir: str, manifest: dict) -> PrepareSummary:
    return PrepareSummary(out_dir, {s: manifest["splits"][s]["count"] for s in SPLITS},
                          manifest["skipped"], manifest["errors"], manifest["notes"],
                          manifest["outside_benchmark"], up_to_date=True)


def _relabelled_hand_centric_classes(out_dir: str, source: dict) -> Optional[PrepareSummary]:
    """When ``out_dir`` holds this dataset but for its hand-centric classes (recorded in the
    manifest only), record the new ones without converting anything again; else None."""
    try:
        manifest = read_manifest(out_dir)
    except (FileNotFoundError, ValueError):
        return None
    source = json.loads(json.dumps(source))
    if manifest.get("source", {}) | {"hand_centric_classes": source["hand_centric_classes"]} != source:
        return None
    manifest.update(hand_centric_classes=source["hand_centric_classes"], source=source)
    write_manifest(out_dir, manifest)  # the versions that wrote the arrays stay
    return _up_to_date_summary(out_dir, manifest)


def _convert_all(pending: List[SampleTask], options: PrepareOptions, workers: int,
                 progress: bool) -> None:
    worker = functools.partial(process_sample, options=options)
    bar = tqdm(total=len(pending), desc="prepare", unit="sample", disable=not progress)
    try:
        if workers <= 1 or len(pending) <= 1:
            for task in pending:
                worker(task)
                bar.update()
        else:
            with multiprocessing.Pool(min(workers, len(pending))) as pool:
                chunk = max(1, min(32, len(pending) // (4 * workers)))
                for _ in pool.imap_unordered(worker, pending, chunksize=chunk):
                    bar.update()
    finally:
        bar.close()


def _write_split(split_dir: str, tasks: List[SampleTask], max_frames: int) -> np.ndarray:
    labels = np.array([ntu.SampleName.parse(t.name).action - 1 for t in tasks], dtype=np.int64)
    with SplitWriter(split_dir, len(tasks), max_frames) as writer:
        for index, task in enumerate(tasks):
            with np.load(task.cache_path) as data:
                writer.add(index, data["body"], data["hand"], data["hand_valid"],
                           labels[index], task.name)
        writer.commit()
    return labels


# --------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``bharnet prepare`` to ``parser``."""
    parser.add_argument("src_dir",
                        help="folder of NTU RGB+D .skeleton files (searched recursively)")
    parser.add_argument("out_dir", help="output dataset folder")
    parser.add_argument("--hands", dest="hands_dir", default=None,
                        help="folder of per-sample hand files <name>.npz or <name>.json")
    parser.add_argument("--benchmark", default="xsub60", choices=sorted(ntu.BENCHMARKS))
    parser.add_argument("--workers", type=int, default=None,
                        help="conversion processes (default: all CPUs)")
    parser.add_argument("--max-frames", type=int, default=300,
                        help="frames stored per sample; longer samples are resampled")
    parser.add_argument("--missing-skeleton", default=None, metavar="FILE",
                        help="text file of sample names with missing skeletons to skip")
    parser.add_argument("--min-body-frames", type=int, default=ntu.MIN_BODY_FRAMES,
                        help="bodies present in fewer frames are treated as noise")
    parser.add_argument("--handedness", default="nearest", choices=hands_io.HANDEDNESS_MODES,
                        help="how a detected hand's side is chosen (JSON hands)")
    parser.add_argument("--hand-space", default="camera", choices=("camera", "color"),
                        help="coordinate space of JSON hands: camera metres or colour pixels")
    parser.add_argument("--hand-max-distance", type=float, default=None,
                        help="farthest hand-to-Kinect-wrist distance accepted")
    parser.add_argument("--hand-min-score", type=float, default=0.0,
                        help="detections scoring lower are ignored")
    parser.add_argument("--hand-centric-classes", default="",
                        help="comma-separated 0-based class indices recorded in the manifest")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``bharnet prepare`` from parsed arguments; returns the exit status."""
    try:
        hand_centric = [int(c) for c in args.hand_centric_classes.split(",") if c.strip()]
        summary = prepare_ntu(
            args.src_dir, args.out_dir, hands_dir=args.hands_dir, benchmark=args.benchmark,
            workers=args.workers, max_frames=args.max_frames,
            missing_skeleton=args.missing_skeleton, min_body_frames=args.min_body_frames,
            handedness=args.handedness, hand_space=args.hand_space,
            hand_max_distance=args.hand_max_distance, hand_min_score=args.hand_min_score,
            hand_centric_classes=hand_centric, progress=not args.no_progress)
    except (OSError, ValueError) as error:
        print(f"bharnet prepare: error: {error}", file=sys.stderr)
        return 2
    print(summary.report())
    return 0
