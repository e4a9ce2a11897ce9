"""Synthetic NTU ``.skeleton`` text for the data tests."""
import numpy as np


def skeleton_text(frames, crlf=False, trailing_spaces=False):
    """``frames``: a list of frames, each a list of (body_id, joints (25, 3)). The colour
    coordinates of a joint are set to 100 * (x, y) so that tests can check them."""
    lines = [str(len(frames))]
    for bodies in frames:
        lines.append(str(len(bodies)))
        for body_id, joints in bodies:
            lines.append(f"{body_id} 0 1 2 1 2 0 -0.1 0.2 2")
            lines.append("25")
            for x, y, z in np.asarray(joints, dtype=np.float64):
                lines.append(f"{x:.6f} {y:.6f} {z:.6f} 250.1 200.2 {100 * x:.4f} {100 * y:.4f} "
                             "0.1 0.2 0.3 0.4 2")
    end = " " if trailing_spaces else ""
    newline = "\r\n" if crlf else "\n"
    return newline.join(line + end for line in lines) + newline


def standing_body(frames, offset=(0.0, 0.0, 3.0), amplitude=0.0, seed=0):
    """A person-shaped (taller than wide) body (frames, 25, 3) whose right arm swings by
    ``amplitude`` metres."""
    rng = np.random.default_rng(seed)
    base = np.stack([rng.uniform(-0.2, 0.2, 25), np.linspace(-0.8, 0.8, 25),
                     rng.uniform(-0.05, 0.05, 25)], axis=-1)
    joints = np.repeat(base[None], frames, axis=0) + np.asarray(offset)
    swing = amplitude * np.sin(np.linspace(0, 4 * np.pi, frames))
    joints[:, 8:12, 0] += swing[:, None]
    return joints.astype(np.float32)


def wide_body(frames, offset=(0.0, 0.0, 3.0), amplitude=0.5, seed=1):
    """A noise body (wider than tall, e.g. furniture) that moves a lot."""
    rng = np.random.default_rng(seed)
    base = np.stack([np.linspace(-1.0, 1.0, 25), rng.uniform(-0.1, 0.1, 25),
                     rng.uniform(-0.05, 0.05, 25)], axis=-1)
    joints = np.repeat(base[None], frames, axis=0) + np.asarray(offset)
    joints[:, :, 1] += amplitude * np.sin(np.linspace(0, 6 * np.pi, frames))[:, None]
    return joints.astype(np.float32)
