"""Binding pockets: protein structures -> voxel grids of atom types -> a 3D model -> ranked pockets.

Example:
    >>> from pixelwise.pockets import read_structure, voxelise, pocket_labels
    >>> structure = read_structure("1hpv.pdb")
    >>> features, grid = voxelise(structure)            # (8, X, Y, Z) at 1 Å
    >>> labels = pocket_labels(grid, structure.ligand)   # voxels within 4 Å of the ligand
"""

from pixelwise.pockets.voxels import CHANNELS, Grid, Structure, atom_channels, pocket_labels, read_structure, voxelise

__all__ = ["CHANNELS", "Grid", "Structure", "atom_channels", "pocket_labels", "read_structure", "voxelise"]
