"""Predicted pocket probabilities -> ranked pockets (centre, volume, score), PDB pseudo-atoms, DCC.

A pocket is a connected component (26-connectivity) of voxels whose pocket probability is at
least ``threshold``; its centre is the probability-weighted mean of its voxel centres, its
volume the number of voxels times the voxel volume, its score the sum of its probabilities
(large, confident pockets first), as in Kalasanty's segmentation-to-pocket step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pixelwise.io import atomic_write_text
from pixelwise.pockets.voxels import Grid, Structure, read_structure, voxelise


@dataclass
class Pocket:
    """One predicted pocket: ``rank`` (1 = best), ``centre`` (x, y, z) Å, ``volume`` Å³,
    ``score`` (sum of probabilities), ``mean_probability``, ``voxels`` (V, 3) centres in Å."""

    rank: int
    centre: tuple[float, float, float]
    volume: float
    score: float
    mean_probability: float
    voxels: np.ndarray


def pockets_from_probabilities(
    probs: np.ndarray, grid: Grid, threshold: float = 0.5, min_volume: float = 20.0
) -> list[Pocket]:
    """Ranked pockets of a (X, Y, Z) pocket-probability grid; components under ``min_volume`` Å³ are dropped."""
    from scipy import ndimage

    if probs.shape != grid.shape:
        raise ValueError(f"probabilities of shape {probs.shape} do not match the grid {grid.shape}")
    components, n = ndimage.label(probs >= threshold, structure=np.ones((3, 3, 3), bool))
    voxel_volume = grid.spacing**3
    found = []
    for label in range(1, n + 1):
        index = np.argwhere(components == label)
        if len(index) * voxel_volume < min_volume:
            continue
        p = probs[tuple(index.T)].astype(np.float64)
        centres = grid.to_world(index)
        centre = (centres * p[:, None]).sum(0) / p.sum()
        centre = tuple(float(c) for c in centre)
        found.append(Pocket(0, centre, len(index) * voxel_volume, float(p.sum()), float(p.mean()), centres))
    found.sort(key=lambda pocket: -pocket.score)
    for rank, pocket in enumerate(found, 1):
        pocket.rank = rank
    return found


def dcc(centre: Sequence[float], ligand: np.ndarray) -> float:
    """Distance (Å) from a pocket centre to the ligand centre (mean of its heavy atoms)."""
    if len(ligand) == 0:
        raise ValueError("the structure has no ligand to measure DCC against")
    return float(np.linalg.norm(np.asarray(centre) - ligand.mean(0)))


def dcc_success(pockets: Sequence[Pocket], ligand: np.ndarray, top: int = 1, threshold: float = 4.0) -> bool:
    """True when one of the ``top`` ranked pockets has its centre within ``threshold`` Å of the ligand centre."""
    return any(dcc(p.centre, ligand) <= threshold for p in pockets[:top])


def _hetatm(serial: int, name: str, resname: str, seq: int, xyz: Sequence[float], b: float, element: str) -> str:
    x, y, z = xyz
    return (
        f"HETATM{serial % 100000:>5} {name:<4} {resname:>3} P{seq % 10000:>4}    "
        f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{b:6.2f}          {element:>2}"
    )


def write_pockets(out: str | Path, pockets: Sequence[Pocket], name: str = "pockets") -> tuple[Path, Path]:
    """Write ``out/NAME.pdb`` and ``out/NAME.json``, atomically.

    PDB: residue ``PKT`` number ``rank`` in chain P; atom ``CEN`` at the centre (B-factor =
    mean probability) and one pseudo-atom ``V`` per voxel. JSON: rank, centre, volume, score.
    """
    out = Path(out)
    lines, serial = [], 1
    for p in pockets:
        lines.append(_hetatm(serial, "CEN", "PKT", p.rank, p.centre, p.mean_probability, "C"))
        serial += 1
        for v in p.voxels:
            lines.append(_hetatm(serial, "V", "PKT", p.rank, v, 0.0, "C"))
            serial += 1
    pdb = atomic_write_text(out / f"{name}.pdb", "\n".join([*lines, "END"]) + "\n")
    summary = [{k: v for k, v in asdict(p).items() if k != "voxels"} for p in pockets]
    return pdb, atomic_write_text(out / f"{name}.json", json.dumps(summary, indent=2) + "\n")


@torch.no_grad()
def predict_pockets(
    model: torch.nn.Module,
    structure: Structure,
    *,
    tile: int | None = 64,
    threshold: float = 0.5,
    min_volume: float = 20.0,
) -> tuple[list[Pocket], np.ndarray, Grid]:
    """Voxelise ``structure``, run a 3D model with 8 input channels and 2 classes (class 1 =
    pocket), and return (ranked pockets, pocket probabilities (X, Y, Z), grid).

    ``tile`` (voxels per side) tiles large proteins with the N-D overlap-tile; None runs whole.
    """
    from pixelwise.inference import predict

    features, grid = voxelise(structure)
    probs = predict(model.eval(), torch.from_numpy(features)[None], tile=tile)[0]
    if probs.shape[0] != 2:
        raise ValueError(f"the pocket model must have 2 output classes (background, pocket), it has {probs.shape[0]}")
    pocket = probs[1].numpy()
    return pockets_from_probabilities(pocket, grid, threshold, min_volume), pocket, grid


def find_pockets_file(
    path: str | Path, model_path: str | Path, out: str | Path, *, tile: int | None = 64, threshold: float = 0.5
) -> tuple[list[Pocket], Path]:
    """``pixelwise pockets``: read a structure, predict with a saved model, write ``out/STEM_pockets.{pdb,json}``."""
    from pixelwise.models import load_model, spatial_dims

    structure = read_structure(path)
    model, _ = load_model(model_path)
    if spatial_dims(model.config["name"]) != 3 or model.config["in_channels"] != 8:
        raise ValueError(
            f"model {model_path} must be a 3D model with 8 input channels (the pocket atom types); "
            f"it is {model.config['name']} with {model.config['in_channels']}"
        )
    pockets, _, _ = predict_pockets(model, structure, tile=tile, threshold=threshold)
    pdb, _ = write_pockets(out, pockets, f"{Path(path).stem}_pockets")
    return pockets, pdb
