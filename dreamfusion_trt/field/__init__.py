"""The scene representation: hash-grid NeRF (density, albedo, normals) and the background."""

from .background import Background, frequency_encoding
from .hashgrid import HashGridEncoding, level_resolutions
from .nerf import FieldOutput, NeRFField, density_blob, make_encoding

__all__ = [
    "Background",
    "FieldOutput",
    "HashGridEncoding",
    "NeRFField",
    "density_blob",
    "frequency_encoding",
    "level_resolutions",
    "make_encoding",
]
