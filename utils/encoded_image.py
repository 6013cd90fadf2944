"""What an encoded image says about itself before it is decoded.

A decoder allocates the width x height its header claims before it reads any pixel data, so a corrupt header
(one flipped bit in a 112x112 JPEG's height can claim 16,496 rows) costs a large allocation per bad record.
Readers of untrusted files check the claim first; JPEG and PNG are read here, other formats are left to OpenCV
(which refuses more than 2^30 pixels).
"""

from __future__ import annotations

import struct

import simplejpeg

MAX_PIXELS = 4096 * 4096  # far beyond any face crop (and 48 MB decoded): a larger claim is a corrupt header


def claimed_pixels(buf: bytes | memoryview) -> int | None:
    """width x height from a JPEG or PNG header, or None (another format, or a header too damaged to read)."""
    if buf[:2] == b"\xff\xd8":
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(buf)
        except (ValueError, KeyError):  # KeyError: simplejpeg's name for an unknown subsampling (fuzzing found it)
            return None
        return height * width
    if buf[:8] == b"\x89PNG\r\n\x1a\n" and len(buf) >= 24:
        width, height = struct.unpack(">II", buf[16:24])
        return width * height
    return None


def plausible_size(buf: bytes | memoryview) -> bool:
    """False if the header claims more than MAX_PIXELS."""
    pixels = claimed_pixels(buf)
    return pixels is None or pixels <= MAX_PIXELS
