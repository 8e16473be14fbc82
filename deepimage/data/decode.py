"""Decode any input image to RGB uint8 at the stored size, or say why it cannot be decoded.

    pixels = decode_square(path, size=72)     # (72, 72, 3) uint8, or raises BadImage(reason)

EXIF orientation is applied; grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit and
float images are converted to 8-bit RGB; animated images give their first frame. The shorter
side is resized to `size` and the centre cut to a `size` x `size` square.

Input is untrusted, so every limit is checked before pixels are decoded:
- formats: only FORMATS are parsed (JPEG, PNG: what datasets ship; GIF, BMP, TIFF, WebP: what
  cameras, scanners and the web give and Pillow decodes itself). Every other plugin (EPS and
  PostScript, which run Ghostscript; PSD, ICNS, FITS, ...) is never tried;
- pixels: width x height from the header at most MAX_PIXELS (a decompression bomb is a small
  file that decodes to gigabytes);
- files: a path must be a regular file (a FIFO would block) of at most MAX_FILE_BYTES, and with
  `root` given, must lie inside root once symlinks are resolved (links within root are followed,
  links out of it, e.g. to /etc/passwd, are refused). The check is made on the opened file
  descriptor, so a link swapped after the check cannot redirect the read.

A JPEG shard row (what the shard stage wrote) decodes straight into a caller's buffer:

    decode_stored_jpeg(row_bytes, out)            # out: (S, S, 3) uint8, C-contiguous

with libjpeg-turbo through simplejpeg (accurate integer IDCT, smooth chroma upsampling): the
same pixels as Pillow's decoder of those bytes (tests/test_decode.py), 1.3-3x faster, with no
intermediate image object or copy. Where simplejpeg is not installed, Pillow decodes them.
"""
from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:          # not in envs/requirements.txt: Pillow decodes, the same pixels, slower
    simplejpeg = None

# Undecodable or hostile input surfaces as one of these; each becomes a skipped-file reason.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                  Image.DecompressionBombError, KeyError, IndexError)
_WHITE = (255, 255, 255, 255)

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")      # Pillow format ids; MPO opens as JPEG
MAX_PIXELS = 89_478_485         # Pillow's default MAX_IMAGE_PIXELS: a quarter GiB of RGBA pixels
# An image within MAX_PIXELS stored uncompressed at 16 bits per RGBA channel is 716 MB: no file
# the pixel limit accepts is refused for its size, and nothing larger is ever read.
MAX_FILE_BYTES = 2 ** 30


class BadImage(Exception):
    """An input file that is not a decodable image; str() is the reason."""


def stored_size(resolution: int, crop_margin: float) -> int:
    """Side of the stored square: round(resolution * (1 + crop_margin)), halves rounded up."""
    if resolution < 1 or crop_margin < 0:
        raise ValueError(f"need resolution >= 1 and crop_margin >= 0, got {resolution} "
                         f"and {crop_margin}")
    return int(resolution * (1 + crop_margin) + 0.5)


def _high_bits(im: Image.Image) -> Image.Image:
    """16-bit or 32-bit integer / float grayscale -> 8-bit 'L' (keep the high byte)."""
    a = np.asarray(im)                                 # (H, W) uint16, int32 or float32
    if im.mode != "F" and a.max(initial=0) > 255:
        a = a >> 8                                     # 16-bit range, in the image's own dtype
    return Image.fromarray(np.ascontiguousarray(np.clip(a, 0, 255), dtype=np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 'RGB'; transparency is composited onto white."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _high_bits(im).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return im.convert("RGB")


def center_square(im: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size`, cut the centre square: (size, size, 3) uint8."""
    w, h = im.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    out = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8)


def open_file(path: str, root: str | None = None):
    """The file at `path`, opened for reading (binary) once it is known to be a regular file of
    at most MAX_FILE_BYTES inside `root` (a resolved folder; None: anywhere); else BadImage."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)   # a FIFO must not block
    except OSError as e:
        raise BadImage(f"{type(e).__name__}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadImage("not a regular file (a FIFO, device or socket)")
        if st.st_size > MAX_FILE_BYTES:
            raise BadImage(f"file is {st.st_size / 2 ** 20:.0f} MiB, over the limit of "
                           f"{MAX_FILE_BYTES // 2 ** 20} MiB for one image")
        if root is not None:
            real = _opened_path(fd, path)
            if not real.startswith(root.rstrip(os.sep) + os.sep):
                raise BadImage(f"a symlink to a file outside the dataset root {root}: not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int, path: str) -> str:
    """Where an open descriptor really points (Linux: the kernel's answer; else realpath)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def decode_square(source: str | bytes, size: int, root: str | None = None) -> np.ndarray:
    """Open a file path (or encoded bytes), decode, orient, convert, resize: (size, size, 3).
    With `root` (a resolved folder), a path that leads outside it is a BadImage."""
    f = io.BytesIO(source) if isinstance(source, bytes) else open_file(source, root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                        # EXIF / palette chatter
            with f, Image.open(f, formats=FORMATS) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise BadImage(f"image is {im.width}x{im.height} pixels, over the limit of "
                                   f"{MAX_PIXELS} pixels (a decompression bomb?)")
                if im.format == "JPEG":
                    im.draft(im.mode, (size, size))               # DCT-domain downscale: faster
                im.load()                                          # first frame of animations
                im = ImageOps.exif_transpose(im)
                rgb = to_rgb(im)
                if rgb.width < 1 or rgb.height < 1:
                    raise BadImage("image has zero width or height")
                return center_square(rgb, size)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(f"UnidentifiedImageError: cannot identify image file "
                       f"(accepted formats: {', '.join(FORMATS)})") from None
    except _DECODE_ERRORS as e:
        raise BadImage(reason(e)) from None


def decode_stored_jpeg(data, out: np.ndarray) -> np.ndarray:
    """A shard's JPEG row (bytes-like) -> `out`, (S, S, 3) uint8, in place; BadImage if the
    bytes are not a JPEG of exactly that size."""
    return (_decode_turbo if simplejpeg is not None else _decode_pillow)(data, out)


def _decode_turbo(data, out: np.ndarray) -> np.ndarray:
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        _check_size(h, w, out)
        return simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False, buffer=out)
    except ValueError as e:
        raise BadImage(reason(e)) from None


def _decode_pillow(data, out: np.ndarray) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            _check_size(im.height, im.width, out)
            out[...] = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return out
    except _DECODE_ERRORS as e:
        raise BadImage(reason(e)) from None


def _check_size(h: int, w: int, out: np.ndarray) -> None:
    if (h, w, 3) != out.shape:
        raise BadImage(f"JPEG row is {h}x{w}, the shards store {out.shape[0]}x{out.shape[1]}")


def reason(e: Exception) -> str:
    """One-line, path-free reason for the skipped-files table."""
    msg = str(e).split(" '/")[0].split(' "/')[0]                   # drop PIL's quoted path
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return " ".join(text.split())[:200]
