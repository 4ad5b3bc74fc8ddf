"""CPU backends for declared upstream tools. Kept import-light: they run in a fresh tool process.

``edge_detection`` backs GPT4Tools' "Edge Detection On Image" (PIL's edge filter, binarised, instead of
OpenCV's Canny); like GPT4Tools it writes ``<same folder>/<first 8 chars of a uuid4>.png`` and returns
that path.
"""

from __future__ import annotations

import os
import uuid

EDGE_THRESHOLD = 64  # FIND_EDGES response above which a pixel is an edge (binary output, like Canny)


def gpt4tools_output_name(input_path: str) -> str:
    """GPT4Tools' get_new_image_name: the input's folder + the first 8 characters of a uuid4 + .png."""
    return os.path.join(os.path.dirname(input_path), f"{str(uuid.uuid4())[:8]}.png")


def edge_detection(image_path: str) -> str:
    """Binary edge map (white edges on black, 3 channels) of an image, saved next to it."""
    import numpy as np
    from PIL import Image, ImageFilter

    with Image.open(image_path) as img:
        gray = np.asarray(img.convert("L"))
    padded = Image.fromarray(np.pad(gray, 1, mode="edge"))  # PIL copies border pixels unfiltered
    edges = padded.filter(ImageFilter.FIND_EDGES).crop((1, 1, gray.shape[1] + 1, gray.shape[0] + 1))
    edges = edges.point([0] * EDGE_THRESHOLD + [255] * (256 - EDGE_THRESHOLD))
    path = gpt4tools_output_name(image_path)
    Image.merge("RGB", (edges, edges, edges)).save(path)
    return path
