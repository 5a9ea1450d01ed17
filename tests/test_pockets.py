"""Binding pockets: atom typing, DeepSite occupancy voxels, ligand labels, ranked pockets, DCC, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gemmi
import numpy as np
import pytest
from typer.testing import CliRunner

from pixelwise.cli import app
from pixelwise.data.volumes import open_volume_dataset
from pixelwise.models import create_model, save_model
from pixelwise.pockets import CHANNELS, Grid, Structure, pocket_labels, read_structure, voxelise
from pixelwise.pockets.detect import dcc, dcc_success, pockets_from_probabilities, write_pockets

HPV = Path("/usr/share/pymol/data/tut/1hpv.pdb")  # Debian package pymol-data: HIV-1 protease + inhibitor 478


def _line(record, serial, name, resname, chain, seq, xyz, element):
    x, y, z = xyz
    return f"{record:<6}{serial:>5} {name:<4} {resname:>3} {chain}{seq:>4}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {element:>2}"


ATOMS = [  # record, name, residue, chain, number, position, element
    ("ATOM", "N", "PHE", "A", 1, (0.0, 0.0, 0.0), "N"),
    ("ATOM", "CA", "PHE", "A", 1, (1.5, 0.0, 0.0), "C"),
    ("ATOM", "C", "PHE", "A", 1, (2.0, 1.4, 0.0), "C"),
    ("ATOM", "O", "PHE", "A", 1, (1.3, 2.4, 0.0), "O"),
    ("ATOM", "CZ", "PHE", "A", 1, (2.0, -3.0, 1.0), "C"),
    ("ATOM", "NZ", "LYS", "A", 2, (4.0, 2.0, 2.0), "N"),
    ("ATOM", "OD1", "ASP", "A", 3, (5.0, 0.0, 3.0), "O"),
    ("HETATM", "ZN", "ZN", "A", 101, (3.0, 3.0, 3.0), "ZN"),
    ("HETATM", "O", "HOH", "A", 201, (8.0, 8.0, 8.0), "O"),
    ("HETATM", "C1", "LIG", "B", 1, (6.0, 6.0, 6.0), "C"),
    ("HETATM", "O1", "LIG", "B", 1, (7.0, 6.0, 6.0), "O"),
    ("HETATM", "H1", "LIG", "B", 1, (6.0, 7.0, 6.0), "H"),
    ("HETATM", "S", "SO4", "B", 2, (-3.0, 0.0, 0.0), "S"),
]


@pytest.fixture
def tiny_pdb(tmp_path) -> Path:
    lines = [_line(r, i, n, res, ch, num, xyz, el) for i, (r, n, res, ch, num, xyz, el) in enumerate(ATOMS, 1)]
    path = tmp_path / "tiny.pdb"
    path.write_text("\n".join([*lines, "END"]) + "\n")
    return path


def test_structure_separates_protein_ligand_and_water(tiny_pdb):
    s = read_structure(tiny_pdb)
    assert len(s.protein) == 8  # 7 amino-acid atoms + the zinc ion; water and ligands left out
    assert s.ligand_name == "LIG" and np.allclose(s.ligand, [(6, 6, 6), (7, 6, 6)])  # hydrogen dropped
    assert read_structure(tiny_pdb, ligand="so4").ligand.tolist() == [[-3.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="LIG, SO4"):
        read_structure(tiny_pdb, ligand="ATP")
    st = gemmi.read_structure(str(tiny_pdb))
    st.setup_entities()
    st.make_mmcif_document().write_file(str(tiny_pdb.with_suffix(".cif")))
    from_cif = read_structure(tiny_pdb.with_suffix(".cif"))
    assert np.array_equal(from_cif.protein, s.protein) and np.array_equal(from_cif.ligand, s.ligand)


def test_atom_types_by_hand(tiny_pdb):
    s = read_structure(tiny_pdb)
    on = {name: {CHANNELS[c] for c in np.flatnonzero(row)} - {"excluded_volume"} for name, row in
          zip(["N", "CA", "C", "O", "CZ", "NZ", "OD1", "ZN"], s.channels)}
    assert on == {
        "N": {"hbond_donor"}, "CA": {"hydrophobic"}, "C": set(), "O": {"hbond_acceptor"},
        "CZ": {"hydrophobic", "aromatic"}, "NZ": {"hbond_donor", "positive_ionizable"},
        "OD1": {"hbond_acceptor", "negative_ionizable"}, "ZN": {"metal"},
    }
    assert s.channels[:, CHANNELS.index("excluded_volume")].all()


def test_voxels_hold_the_deepsite_occupancy_maximum_by_brute_force():
    atoms = np.array([[0.3, 0.0, 0.0], [2.2, 1.6, 0.4]])
    channels = np.zeros((2, 8), bool)
    channels[:, 7] = True
    channels[0, 0] = True
    structure = Structure(atoms, channels, np.array([1.9, 1.7]), np.zeros((0, 3)))
    grid = Grid(origin=(-1.0, -1.0, -1.0), spacing=1.0, shape=(6, 5, 4))
    features, _ = voxelise(structure, grid)
    centres = grid.centres()
    r = np.linalg.norm(centres[..., None, :] - atoms, axis=-1)  # (X, Y, Z, 2)
    with np.errstate(divide="ignore"):
        n = np.where(r < 2 * np.array([1.9, 1.7]), 1 - np.exp(-((np.array([1.9, 1.7]) / r) ** 12)), 0.0)
    np.testing.assert_allclose(features[7], n.max(-1), rtol=1e-6)
    np.testing.assert_allclose(features[0], n[..., 0], rtol=1e-6)
    assert not features[1:7].any()


def test_pocket_labels_are_the_voxels_near_ligand_atoms():
    grid = Grid(origin=(0.0, 0.0, 0.0), spacing=1.0, shape=(10, 9, 8))
    ligand = np.array([[2.0, 2.0, 2.0], [6.5, 4.0, 3.0]])
    labels = pocket_labels(grid, ligand, radius=2.5)
    near = (np.linalg.norm(grid.centres()[..., None, :] - ligand, axis=-1) <= 2.5).any(-1)
    assert np.array_equal(labels.astype(bool), near) and labels.sum() > 0


def test_pockets_are_ranked_components_with_weighted_centres():
    grid = Grid(origin=(10.0, 0.0, 0.0), spacing=2.0, shape=(12, 12, 12))
    probs = np.zeros(grid.shape)
    probs[1:3, 1:3, 1:3] = 0.6  # 8 voxels, score 4.8
    probs[6:9, 6:9, 6:8] = 0.9  # 18 voxels, score 16.2
    probs[6, 6, 6] = 1.0  # pulls the centre towards (6, 6, 6)
    probs[11, 0, 0] = 0.99  # one voxel: 8 Å^3 < min_volume
    pockets = pockets_from_probabilities(probs, grid, threshold=0.5, min_volume=20.0)
    assert [p.rank for p in pockets] == [1, 2]
    big, small = pockets
    assert big.volume == 18 * 8.0 and small.volume == 8 * 8.0
    assert big.score == pytest.approx(17 * 0.9 + 1.0) and small.score == pytest.approx(4.8)
    idx = np.argwhere(probs[6:9, 6:9, 6:8] > 0) + 6
    w = probs[tuple(idx.T)]
    expected = 10.0 * np.array([1, 0, 0]) + 2.0 * (idx * w[:, None]).sum(0) / w.sum()
    assert np.allclose(big.centre, expected) and np.allclose(small.centre, (10 + 2 * 1.5, 3.0, 3.0))
    assert dcc(small.centre, np.array([[13.0, 3.0, 6.0], [13.0, 3.0, 0.0]])) == pytest.approx(0.0)
    assert dcc_success(pockets, np.array([[13.0, 3.0, 3.0]]), top=2) and not dcc_success(pockets, np.array([[13.0, 3.0, 3.0]]))


def test_written_pockets_read_back_as_pseudo_atoms(tmp_path):
    grid = Grid(origin=(0.0, 0.0, 0.0), spacing=1.0, shape=(8, 8, 8))
    probs = np.zeros(grid.shape)
    probs[1:4, 1:4, 1:4] = 0.8
    probs[5:8, 5:8, 5:8] = 0.7
    pockets = pockets_from_probabilities(probs, grid)
    pdb, summary = write_pockets(tmp_path, pockets)
    st = gemmi.read_structure(str(pdb))
    residues = list(st[0]["P"])
    assert [r.seqid.num for r in residues] == [1, 2] and all(r.name == "PKT" for r in residues)
    assert len(residues[0]) == 1 + 27 and np.allclose(residues[0]["CEN"][0].pos.tolist(), pockets[0].centre, atol=1e-3)
    rows = json.loads(summary.read_text())
    assert [(r["rank"], r["volume"]) for r in rows] == [(1, 27.0), (2, 27.0)]


def test_pockets_data_spec_gives_atom_channels_and_ligand_labels(tiny_pdb):
    ds = open_volume_dataset(f"pockets:{tiny_pdb.parent}", "train")
    image, labels = ds[0]
    assert image.shape[0] == 8 and ds.class_names == ["background", "pocket"]
    assert labels.shape == image.shape[1:] and 0 < int(labels.sum()) < labels.numel()


def test_pockets_command_writes_ranked_pockets(tiny_pdb, tmp_path):
    model = create_model("unet3d", num_classes=2, in_channels=8, base_channels=2, depth=1)
    save_model(model, tmp_path / "pockets_model")
    result = CliRunner().invoke(app, ["pockets", str(tiny_pdb), "--model", str(tmp_path / "pockets_model.safetensors"),
                                      "--out", str(tmp_path / "out"), "--threshold", "0", "--tile", "0"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "tiny_pockets.json").read_text())
    # Threshold 0: the whole grid (protein box + 4 Å) is one pocket.
    grid = Grid.around(read_structure(tiny_pdb).protein)
    assert len(rows) == 1 and rows[0]["volume"] == float(np.prod(grid.shape))
    save_model(create_model("unet", num_classes=2, in_channels=8, base_channels=2, depth=1), tmp_path / "flat")
    result = CliRunner().invoke(app, ["pockets", str(tiny_pdb), "--model", str(tmp_path / "flat.safetensors")])
    assert result.exit_code != 0 and "3D model with 8 input channels" in str(result.exception)


@pytest.mark.skipif(not HPV.is_file(), reason="pymol-data (1hpv.pdb) not installed")
def test_hiv_protease_pocket_is_where_the_inhibitor_binds():
    s = read_structure(HPV)
    assert s.ligand_name == "478" and len(s.ligand) == 35 and len(s.protein) > 1500
    features, grid = voxelise(s)
    labels = pocket_labels(grid, s.ligand)
    # The labelled pocket, read as a prediction, is one pocket centred on the inhibitor (DCC < 4 Å).
    pockets = pockets_from_probabilities(labels.astype(float), grid)
    assert len(pockets) == 1 and dcc_success(pockets, s.ligand)
    # Same frame for protein and ligand: no protein occupancy at the inhibitor's atoms, yet the
    # site is buried: the protein fills more of the 8 Å around it than of the box on average.
    at_ligand = np.rint((s.ligand - np.asarray(grid.origin)) / grid.spacing).astype(int)
    excluded = features[CHANNELS.index("excluded_volume")]
    assert excluded[tuple(at_ligand.T)].max() < 0.1
    around = np.linalg.norm(grid.centres() - s.ligand.mean(0), axis=-1) < 8.0
    assert excluded[around].mean() > excluded.mean()
