"""Training from scribbles: simulated strokes, ScribbleSup propagation, regularized losses."""

from pixelwise.weak.graphcut import alpha_expansion, potts_energy
from pixelwise.weak.scribblesup import propagate_labels
from pixelwise.weak.simulate import labelled_fraction, simulate_scribbles
from pixelwise.weak.superpixels import SuperpixelGraph, build_superpixel_graph

__all__ = [
    "SuperpixelGraph",
    "alpha_expansion",
    "build_superpixel_graph",
    "labelled_fraction",
    "potts_energy",
    "propagate_labels",
    "simulate_scribbles",
]
