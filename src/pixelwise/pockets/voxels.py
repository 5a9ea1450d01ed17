"""Protein structures -> per-voxel atom-type channels and pocket labels on a 1 Å grid.

Channels follow DeepSite (Jiménez et al., Bioinformatics 2017) and Kalasanty (Stepniewska-
Dziubinska et al., Bioinformatics 2020): hydrophobic, aromatic, H-bond donor, H-bond acceptor,
positive ionisable, negative ionisable, metal, excluded volume. Each heavy atom contributes
DeepSite's occupancy ``n(r) = 1 - exp(-(r_vdw / r)**12)`` to the voxels of its channels,
combined by maximum. Protein atoms are typed from residue and atom names (standard amino
acids); atoms of other residues fall back to their element.

Grid arrays are indexed (x, y, z): voxel (i, j, k) has its centre at ``origin + spacing * (i, j, k)`` Å.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHANNELS = (
    "hydrophobic",
    "aromatic",
    "hbond_donor",
    "hbond_acceptor",
    "positive_ionizable",
    "negative_ionizable",
    "metal",
    "excluded_volume",
)

METALS = {"ZN", "MG", "CA", "MN", "FE", "CU", "CO", "NI", "NA", "K", "CD", "HG"}
VDW_RADIUS = {"C": 1.9, "N": 1.8, "O": 1.7, "S": 2.0, "P": 2.1, "SE": 2.1}  # AutoDock 4 radii / 2; others 1.5
_RING = ("CG", "CD1", "CD2", "CE1", "CE2", "CZ")
AROMATIC = {
    "PHE": set(_RING), "TYR": set(_RING),
    "TRP": {"CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2"},
    "HIS": {"CG", "ND1", "CD2", "CE1", "NE2"},
}
DONORS = {
    "ARG": {"NE", "NH1", "NH2"}, "ASN": {"ND2"}, "GLN": {"NE2"}, "HIS": {"ND1", "NE2"}, "LYS": {"NZ"},
    "SER": {"OG"}, "THR": {"OG1"}, "TYR": {"OH"}, "TRP": {"NE1"}, "CYS": {"SG"},
}
ACCEPTORS = {
    "ASP": {"OD1", "OD2"}, "GLU": {"OE1", "OE2"}, "ASN": {"OD1"}, "GLN": {"OE1"}, "HIS": {"ND1", "NE2"},
    "SER": {"OG"}, "THR": {"OG1"}, "TYR": {"OH"}, "MET": {"SD"},
}
POSITIVE = {"ARG": {"NE", "NH1", "NH2"}, "LYS": {"NZ"}, "HIS": {"ND1", "NE2"}}
NEGATIVE = {"ASP": {"OD1", "OD2"}, "GLU": {"OE1", "OE2"}}
AMINO_ACIDS = {
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
    "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL",
}


def atom_channels(residue: str, atom: str, element: str) -> np.ndarray:
    """Which of :data:`CHANNELS` a heavy atom belongs to: bool (8,).

    Standard residues: carbons (and MET/CYS sulphur) are hydrophobic except the backbone
    carbonyl C; backbone N (not PRO) donates, backbone O / OXT accept (OXT is also negative);
    side chains by the tables above. Other residues: C hydrophobic, N donor, O acceptor, metal
    ions metal. Every atom is excluded volume.
    """
    residue, atom, element = residue.upper(), atom.upper(), element.upper()
    c = np.zeros(len(CHANNELS), bool)
    c[7] = True
    if element in METALS:
        c[6] = True
        return c
    if residue in AMINO_ACIDS:
        c[0] = (element == "C" and atom != "C") or (element == "S" and residue in ("MET", "CYS"))
        c[1] = atom in AROMATIC.get(residue, ())
        c[2] = (atom == "N" and residue != "PRO") or atom in DONORS.get(residue, ())
        c[3] = atom in ("O", "OXT") or atom in ACCEPTORS.get(residue, ())
        c[4] = atom in POSITIVE.get(residue, ())
        c[5] = atom == "OXT" or atom in NEGATIVE.get(residue, ())
    else:
        c[0], c[2], c[3] = element == "C", element == "N", element == "O"
    return c


@dataclass
class Structure:
    """Heavy atoms of a protein and its bound ligand.

    Attributes:
        protein: (P, 3) coordinates in Å.
        channels: (P, 8) bool atom types (:data:`CHANNELS`).
        radii: (P,) van der Waals radii in Å.
        ligand: (L, 3) coordinates of the ligand's heavy atoms (L = 0 when there is none).
        ligand_name: residue name of the ligand ("" when none).
    """

    protein: np.ndarray
    channels: np.ndarray
    radii: np.ndarray
    ligand: np.ndarray
    ligand_name: str = ""


def read_structure(path: str | Path, ligand: str | None = None) -> Structure:
    """Read a PDB / mmCIF file with gemmi (first model; waters and hydrogens dropped).

    Polymer residues and metal ions are the protein. The ligand is the residue named
    ``ligand``, or by default the non-polymer, non-water residue with the most heavy atoms;
    other small molecules (ions aside) are left out of both.
    """
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"structure file {path} does not exist; pass a .pdb or .cif file")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as err:
        try:  # old PDB files keep an id and serial numbers in columns 73-80, where charges now go
            st = gemmi.read_pdb(str(path), max_line_length=72)
        except (RuntimeError, ValueError):
            raise ValueError(f"cannot read structure {path}: {err}") from err
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_waters()
    if len(st) == 0:
        raise ValueError(f"structure {path} holds no model")
    protein, channels, radii, others = [], [], [], {}
    for chain in st[0]:
        for residue in chain:
            heavy = [a for a in residue if a.element.name not in ("H", "D")]
            is_polymer = residue.entity_type == gemmi.EntityType.Polymer or residue.name in AMINO_ACIDS
            for a in heavy:
                element = a.element.name.upper()
                if is_polymer or element in METALS:
                    protein.append(a.pos.tolist())
                    channels.append(atom_channels(residue.name, a.name, element))
                    radii.append(VDW_RADIUS.get(element, 1.5))
            if not is_polymer and not all(a.element.name.upper() in METALS for a in heavy):
                key = (residue.name, chain.name, str(residue.seqid))
                others[key] = [a.pos.tolist() for a in heavy]
    if not protein:
        raise ValueError(f"structure {path} has no protein atoms")
    chosen = [k for k in others if ligand is None or k[0] == ligand.upper()]
    if ligand is not None and not chosen:
        names = sorted({k[0] for k in others})
        raise ValueError(
            f"structure {path} has no ligand named {ligand!r}; its small molecules: {', '.join(names) or 'none'}"
        )
    best = max(chosen, key=lambda k: len(others[k]), default=None)
    return Structure(
        np.asarray(protein, np.float64), np.asarray(channels, bool), np.asarray(radii, np.float64),
        np.asarray(others[best] if best else np.zeros((0, 3)), np.float64).reshape(-1, 3), best[0] if best else "",
    )


@dataclass(frozen=True)
class Grid:
    """A regular grid: voxel (i, j, k) centred at ``origin + spacing * (i, j, k)`` Å; ``shape`` (X, Y, Z)."""

    origin: tuple[float, float, float]
    spacing: float
    shape: tuple[int, int, int]

    @classmethod
    def around(cls, coords: np.ndarray, spacing: float = 1.0, padding: float = 4.0) -> Grid:
        """The smallest grid covering ``coords`` (N, 3) plus ``padding`` Å on every side."""
        low = coords.min(0) - padding
        high = coords.max(0) + padding
        shape = tuple(int(n) for n in np.floor((high - low) / spacing).astype(int) + 1)
        return cls(tuple(float(v) for v in low), float(spacing), shape)

    def centres(self) -> np.ndarray:
        """Voxel centres (X, Y, Z, 3) in Å."""
        axes = [self.origin[d] + self.spacing * np.arange(self.shape[d]) for d in range(3)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1)

    def to_world(self, index: np.ndarray) -> np.ndarray:
        """(..., 3) voxel indices (may be fractional) -> coordinates in Å."""
        return np.asarray(self.origin) + self.spacing * np.asarray(index, np.float64)


def voxelise(structure: Structure, grid: Grid | None = None, cutoff: float = 2.0) -> tuple[np.ndarray, Grid]:
    """Channels (8, X, Y, Z) float32 of the protein atoms on ``grid`` (default: :meth:`Grid.around` at 1 Å).

    Voxel value per channel: max over that channel's atoms of ``1 - exp(-(r_vdw / r)**12)``,
    ``r`` the distance from the atom to the voxel centre (1 at r = 0), for r < ``cutoff`` * r_vdw.
    """
    grid = grid or Grid.around(structure.protein)
    out = np.zeros((len(CHANNELS), *grid.shape), np.float32)
    reach = int(np.ceil(cutoff * structure.radii.max() / grid.spacing))
    offsets = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    nearest = np.rint((structure.protein - np.asarray(grid.origin)) / grid.spacing).astype(int)
    voxels = nearest[:, None, :] + offsets[None]  # (P, O, 3)
    r = np.linalg.norm(grid.to_world(voxels) - structure.protein[:, None, :], axis=-1)
    with np.errstate(divide="ignore", over="ignore"):
        value = 1 - np.exp(-((structure.radii[:, None] / r) ** 12))
    keep = (r < cutoff * structure.radii[:, None]) & (voxels >= 0).all(-1) & (voxels < np.asarray(grid.shape)).all(-1)
    atom, offset = np.nonzero(keep)
    flat = np.ravel_multi_index(tuple(voxels[atom, offset].T), grid.shape)
    value = value[atom, offset].astype(np.float32)
    for c in range(len(CHANNELS)):
        mine = structure.channels[atom, c]
        # Max per voxel: sort by (voxel, value) and keep each voxel's last entry.
        order = np.lexsort((value[mine], flat[mine]))
        f, v = flat[mine][order], value[mine][order]
        last = np.r_[f[1:] != f[:-1], True] if len(f) else np.zeros(0, bool)
        out[c].reshape(-1)[f[last]] = v[last]
    return out, grid


def pocket_labels(grid: Grid, ligand: np.ndarray, radius: float = 4.0) -> np.ndarray:
    """(X, Y, Z) uint8: 1 for voxels whose centre lies within ``radius`` Å of a ligand heavy atom."""
    from scipy.spatial import cKDTree

    labels = np.zeros(grid.shape, np.uint8)
    if len(ligand):
        # distance_upper_bound excludes distances equal to it: nudge it so "within" includes radius.
        bound = np.nextafter(radius, np.inf)
        distance, _ = cKDTree(ligand).query(grid.centres().reshape(-1, 3), distance_upper_bound=bound)
        labels.reshape(-1)[distance <= radius] = 1
    return labels
