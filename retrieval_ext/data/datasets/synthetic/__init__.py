"""A procedural instance-search benchmark and a generic detection set, both written to disk.

The benchmark (:func:`generate_synthetic_benchmark`, custom format, see :mod:`.benchmark`) stands
in for Oxford 5k on a CPU budget: planar object instances planted into cluttered procedural
scenes, with separate query views. The generic detection set
(:func:`generate_generic_detection_set`, COCO json, see :mod:`.generic`) stands in for COCO when
pretraining the RPN and box head, with shapes none of which is a benchmark instance.

Modules, in the order an image is made:

- :mod:`.streams`: the random stream of each part of the data;
- :mod:`.textures`: what an object looks like in its own frame (posters, generic shapes);
- :mod:`.warp`: placing one object into an image (pose, illumination, warp, masks, boxes);
- :mod:`.scene`: background scenes, final degradations, the JPEG file;
- :mod:`.compose`: one benchmark image (instances, distractors, occluders);
- :mod:`.benchmark`, :mod:`.generic`: the two datasets and their files.

Everything is deterministic in ``seed``: random numbers come from ``numpy.random.Generator``
streams keyed by (seed, purpose, index), drawing uses OpenCV, files are written by Pillow at a
fixed JPEG quality, so the same seed gives byte-identical files.
"""

from .benchmark import generate_synthetic_benchmark, object_names
from .generic import generate_generic_detection_set
from .textures import GENERIC_CATEGORIES

__all__ = [
    "GENERIC_CATEGORIES",
    "generate_synthetic_benchmark",
    "generate_generic_detection_set",
    "object_names",
]
