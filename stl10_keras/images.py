"""The one image path: encoded bytes -> decode -> orient -> channels -> resize.

Training (`--dataset folder`), `stl10_keras.predict`, the SavedModel's
`serving_bytes` signature (in its graph) and the REST and gRPC servers all
turn an image file into the model's uint8 input with `preprocess`, built from
TensorFlow ops only, so what a model sees cannot differ between training and
serving. Each step:

1. decode (`decode`): JPEG with the accurate integer IDCT (libjpeg's
   default, which Pillow uses too; TensorFlow's own default is the fast one),
   CMYK JPEGs converted to RGB by libjpeg; PNG at 16 bits, scaled to 8 as
   `round(v * 255 / 65535)` (an 8-bit PNG is unchanged); GIF's first frame;
   BMP (1, 4 and 8 bits with their palette, 24 and 32 bits; not RLE); WebP.
2. orient (`exif_orientation`, `orient`): the EXIF orientation tag of a
   JPEG (APP1), a PNG (an `eXIf` chunk before the pixel data) or a WebP
   (`EXIF` chunk) is applied, as `PIL.ImageOps.exif_transpose` does.
3. channels (`to_channels`): transparency is dropped; grey becomes RGB by
   repetition; RGB becomes grey with Pillow's integer ITU-R 601-2 luminance,
   `L = (19595 R + 38470 G + 7471 B + 32768) >> 16`.
4. resize (`resize`): Pillow's bilinear filter, bit for bit: a triangle
   filter widened by the downscaling factor (antialiased), coefficients in
   22-bit fixed point, rounded to uint8 between the two passes, in Pillow
   13's order of the passes. An image already at the size is unchanged.

This module imports TensorFlow inside its functions (the commands check their
paths before TensorFlow loads) and nothing of the project.
"""

from __future__ import annotations

from typing import Any

#: What `preprocess` decodes (Pillow's format names; MPO is a camera's JPEG).
FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")
#: A BMP's run-length compressions (its header's `compression`), not decoded.
BMP_RLE8, BMP_RLE4 = 1, 2
#: Pillow's fixed-point precision of its 8-bit resampling (`Resample.c`).
_PRECISION_BITS = 22
#: EXIF's orientation tag.
_ORIENTATION_TAG = 0x0112
#: The most IFD entries and file blocks (JPEG segments, PNG / WebP chunks) read
#: while looking for the orientation: metadata comes first, pixels after.
_MAX_IFD_ENTRIES = 64
_MAX_BLOCKS = 64


def preprocess(image_bytes: Any, height: int, width: int, channels: int):
    """One encoded image -> the model's uint8 input `[height, width, channels]`.

    The whole path (see the module docstring); eager or inside a graph
    (`tf.function`, `tf.data`, the SavedModel's `serving_bytes`).

    Args:
        image_bytes: a scalar string tensor, the encoded image (JPEG, PNG,
            GIF, BMP or WebP).
        height, width: the model's input size.
        channels: 1 or 3.

    Returns:
        A uint8 tensor `[height, width, channels]`.

    Raises:
        tf.errors.InvalidArgumentError: the bytes cannot be decoded.
    """
    image = decode(image_bytes)
    image = orient(image, exif_orientation(image_bytes))
    return resize(to_channels(image, channels), height, width)


def decode(image_bytes: Any):
    """Decode an image as stored: uint8 `[H, W, C]`, C in 1..4 (grey, grey and
    alpha, RGB, RGBA); not yet oriented."""
    import tensorflow as tf

    head = tf.strings.substr(image_bytes, 0, 12)
    magic = tf.strings.substr(head, 0, 4)
    is_jpeg = tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff")
    is_png = tf.equal(magic, b"\x89PNG")
    is_bmp = tf.equal(tf.strings.substr(head, 0, 2), b"BM")

    def jpeg():
        return tf.io.decode_jpeg(image_bytes, channels=0,
                                 dct_method="INTEGER_ACCURATE")

    def png():
        wide = tf.cast(tf.io.decode_png(image_bytes, channels=0, dtype=tf.uint16),
                       tf.int32)
        return tf.cast((wide + 128) // 257, tf.uint8)  # round(v / 257)

    def other():  # GIF (first frame), WebP, or an error naming the format
        return tf.io.decode_image(image_bytes, channels=0, expand_animations=False)

    image = tf.case([(is_jpeg, jpeg), (is_png, png),
                     (is_bmp, lambda: _decode_bmp(image_bytes))],
                    default=other, exclusive=True)
    image.set_shape([None, None, None])
    return image


def _decode_bmp(image_bytes: Any):
    """A BMP: 1, 4 and 8 bits through its palette (TensorFlow's decoder reads an
    8-bit BMP's indices as grey and refuses 1 and 4 bits), others by TF."""
    import tensorflow as tf

    data = _Bytes(image_bytes, little_endian=True)
    bits = data.u16(28)

    def indexed():
        width, height = data.u32(18), data.s32(22)
        header = data.u32(14)
        offset = data.u32(10)
        colours = data.u32(46)
        colours = tf.where(colours == 0, tf.bitwise.left_shift(
            tf.constant(1, tf.int64), bits), colours)
        stride = (width * bits + 31) // 32 * 4  # rows padded to 4 bytes
        rows = tf.abs(height)
        tf.debugging.assert_equal(data.u32(30), tf.constant(0, tf.int64),
                                  "compressed (RLE) BMP images are not supported")
        raw = tf.reshape(data.span(offset, rows * stride), [rows, stride])
        per_byte = 8 // bits
        shifts = tf.range(per_byte - 1, -1, -1, tf.int64) * bits
        mask = tf.bitwise.left_shift(tf.constant(1, tf.int64), bits) - 1
        index = tf.bitwise.bitwise_and(
            tf.bitwise.right_shift(raw[:, :, None], shifts[None, None, :]), mask)
        index = tf.reshape(index, [rows, stride * per_byte])[:, :width]
        palette = tf.reshape(data.span(14 + header, colours * 4), [-1, 4])
        rgb = tf.gather(palette[:, 2::-1], tf.minimum(index, colours - 1))
        # Rows are stored bottom-up unless the height is negative.
        rgb = tf.cond(height > 0, lambda: rgb[::-1], lambda: rgb)
        return tf.cast(rgb, tf.uint8)

    def direct():
        return tf.io.decode_bmp(image_bytes, channels=0)

    return tf.cond(bits <= 8, indexed, direct)


class _Bytes:
    """Little- or big-endian integers at byte offsets of a string tensor, as int64.

    Reads past the end (or before the start) see zeros instead of failing: the
    metadata parsers below test what they read rather than trusting a file.
    """

    def __init__(self, image_bytes: Any, little_endian: Any = True):
        import tensorflow as tf

        raw = tf.io.decode_raw(image_bytes, tf.uint8)
        self.size = tf.size(raw, out_type=tf.int64)
        self.bytes = tf.concat([tf.cast(raw, tf.int64), tf.zeros([8], tf.int64)], 0)
        self.little = tf.convert_to_tensor(little_endian)

    def at(self, i):
        import tensorflow as tf

        i = tf.convert_to_tensor(i, tf.int64)
        inside = (i >= 0) & (i < self.size)
        return tf.where(inside, tf.gather(self.bytes, tf.clip_by_value(
            i, 0, self.size)), tf.zeros_like(i))

    def _int(self, i, n):
        import tensorflow as tf

        i = tf.convert_to_tensor(i, tf.int64)
        parts = [self.at(i + k) for k in range(n)]
        big = sum(p * 256 ** (n - 1 - k) for k, p in enumerate(parts))
        little = sum(p * 256 ** k for k, p in enumerate(parts))
        return tf.where(self.little, little, big)

    def u16(self, i):
        return self._int(i, 2)

    def u32(self, i):
        return self._int(i, 4)

    def s32(self, i):
        value = self.u32(i)
        return value - (value // 2**31) * 2**32

    def span(self, start, length):
        """`length` bytes from `start` (zeros past the end)."""
        import tensorflow as tf

        return self.at(tf.cast(start, tf.int64) + tf.range(
            tf.cast(length, tf.int64), dtype=tf.int64))

    def equals(self, i, text: bytes):
        import tensorflow as tf

        got = self.span(i, len(text))
        return tf.reduce_all(tf.equal(got, tf.constant(list(text), tf.int64)))


def exif_orientation(image_bytes: Any):
    """The EXIF orientation (1..8; 1 when there is none) of a JPEG, PNG or WebP.

    Read as Pillow reads it: JPEG's first APP1 `Exif` segment, PNG's `eXIf`
    chunk (before the pixel data), WebP's `EXIF` chunk; then the tag 0x0112 of
    the first IFD. Anything unreadable or out of range is 1 (no change).
    """
    import tensorflow as tf

    big = _Bytes(image_bytes, little_endian=False)
    little = _Bytes(image_bytes, little_endian=True)
    no = tf.constant(-1, tf.int64)

    def walk(start, step, found_at, stop):
        """Blocks from `start`; `step(pos)` -> next pos, `found_at(pos)` -> the
        TIFF header's offset or -1, `stop(pos)` -> end of the metadata."""
        def cond(pos, found, n):
            return (found < 0) & (n < _MAX_BLOCKS) & (pos >= 0) \
                & (pos + 8 <= big.size) & tf.logical_not(stop(pos))

        def body(pos, found, n):
            return step(pos), found_at(pos), n + 1

        _, found, _ = tf.while_loop(cond, body, (start, no, tf.constant(0)))
        return found

    def jpeg():
        # Segments: FF xx, a big-endian length that counts itself; the pixels
        # start at SOS (FF DA).
        return walk(
            tf.constant(2, tf.int64),
            lambda pos: pos + 2 + big.u16(pos + 2),
            lambda pos: tf.where((big.at(pos + 1) == 0xE1)
                                 & big.equals(pos + 4, b"Exif\0\0"), pos + 10, no),
            lambda pos: (big.at(pos) != 0xFF) | (big.at(pos + 1) == 0xDA)
            | (big.at(pos + 1) == 0xD9))

    def png():
        # Chunks: a big-endian length, a type, the data, a CRC.
        return walk(
            tf.constant(8, tf.int64),
            lambda pos: pos + 12 + big.u32(pos),
            lambda pos: tf.where(big.equals(pos + 4, b"eXIf"), pos + 8, no),
            lambda pos: big.equals(pos + 4, b"IDAT") | big.equals(pos + 4, b"IEND"))

    def webp():
        # RIFF chunks: a type, a little-endian length, the data padded to even;
        # the EXIF data may start with "Exif\0\0".
        def found_at(pos):
            skip = tf.where(big.equals(pos + 8, b"Exif\0\0"), 6, 0)
            return tf.where(big.equals(pos, b"EXIF"),
                            pos + 8 + tf.cast(skip, tf.int64), no)

        return walk(
            tf.constant(12, tf.int64),
            lambda pos: pos + 8 + (little.u32(pos + 4) + 1) // 2 * 2,
            found_at,
            lambda pos: tf.constant(False))

    tiff = tf.case([
        (big.equals(0, b"\xff\xd8\xff"), jpeg),
        (big.equals(0, b"\x89PNG"), png),
        (big.equals(0, b"RIFF") & big.equals(8, b"WEBP"), webp),
    ], default=lambda: no, exclusive=True)

    def read_tag():
        intel = big.equals(tiff, b"II*\0")
        tiff_ok = intel | big.equals(tiff, b"MM\0*")
        order = _Bytes(image_bytes, little_endian=intel)
        ifd = tiff + order.u32(tiff + 4)
        count = order.u16(ifd)
        k = tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64)
        entries = ifd + 2 + 12 * k
        tags = order.u16(entries)
        values = order.u16(entries + 8)
        match = (k < count) & tf.equal(tags, _ORIENTATION_TAG)
        value = tf.reduce_max(tf.where(match, values, tf.zeros_like(values)))
        valid = tiff_ok & tf.reduce_any(match) & (value >= 1) & (value <= 8)
        return tf.where(valid, value, 1)

    return tf.cond(tiff >= 0, read_tag, lambda: tf.constant(1, tf.int64))


def orient(image: Any, orientation: Any):
    """`image` turned upright for an EXIF `orientation` (1..8), as
    `PIL.ImageOps.exif_transpose`: 2 mirror, 3 rotate 180, 4 flip, 5 transpose,
    6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise."""
    import tensorflow as tf

    def transposed():  # rows <-> columns (tf.image.rot90 adds asserts)
        return tf.transpose(image, [1, 0, 2])

    branches = [
        lambda: image,
        lambda: tf.reverse(image, [1]),
        lambda: tf.reverse(image, [0, 1]),
        lambda: tf.reverse(image, [0]),
        transposed,
        lambda: tf.reverse(transposed(), [1]),
        lambda: tf.reverse(transposed(), [0, 1]),
        lambda: tf.reverse(transposed(), [0]),
    ]
    index = tf.cast(tf.clip_by_value(orientation, 1, 8) - 1, tf.int32)
    out = tf.switch_case(index, branches)
    out.set_shape([None, None, image.shape[-1]])
    return out


def to_channels(image: Any, channels: int):
    """uint8 `[..., H, W, 1..4]` -> `[..., H, W, channels]`: alpha dropped, grey
    repeated into RGB, RGB to grey with Pillow's luminance (module docstring)."""
    import tensorflow as tf

    image = tf.convert_to_tensor(image)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    have = tf.shape(image)[-1]

    def from_grey():
        grey = image[..., :1]
        return grey if channels == 1 else tf.repeat(grey, 3, axis=-1)

    def from_rgb():
        rgb = image[..., :3]
        if channels == 3:
            return rgb
        r, g, b = tf.unstack(tf.cast(rgb, tf.int32), num=3, axis=-1)
        grey = tf.bitwise.right_shift(19595 * r + 38470 * g + 7471 * b + 32768, 16)
        return tf.cast(grey, tf.uint8)[..., None]

    out = tf.cond(have <= 2, from_grey, from_rgb)
    out.set_shape(image.shape[:-1].concatenate([channels]))
    return out


def resize(image: Any, height: int, width: int):
    """uint8 `[..., H, W, C]` -> `[..., height, width, C]` with Pillow's
    bilinear filter, bit for bit (`Image.resize(..., Resampling.BILINEAR)` of
    an `L` or `RGB` image, Pillow 13); a batch is resized image by image."""
    import tensorflow as tf

    image = tf.convert_to_tensor(image)
    size = tf.shape(image, out_type=tf.int64)
    # Pillow 13's order of the two passes (the intermediate is rounded to
    # uint8, so the order shows): vertical first where the height shrinks by
    # more than twice as many pixels as the width.
    shrink = size[-3] - height
    vertical_first = (shrink > 0) & (shrink > (size[-2] - width) * 2)

    def horizontal_then_vertical():
        return _resample(_resample(image, width, axis=-2), height, axis=-3)

    def vertical_then_horizontal():
        return _resample(_resample(image, height, axis=-3), width, axis=-2)

    out = tf.cond(vertical_first, vertical_then_horizontal, horizontal_then_vertical)
    out.set_shape(image.shape[:-3].concatenate([height, width, image.shape[-1]]))
    return out


def _resample(image: Any, out_size: int, axis: int):
    """One pass of Pillow's `ImagingResample{Horizontal,Vertical}_8bpc` along
    `axis` (-3: rows, -2: columns)."""
    import tensorflow as tf

    in_size = tf.shape(image, out_type=tf.int64)[axis]
    index, weights = _coefficients(in_size, out_size)
    taps = tf.shape(index)[1]
    broadcast = [out_size] + [1] * (-axis - 1)  # weights along `axis`

    # Pillow's integer sums: pixels < 2**8 times weights <= 2**22 stay below
    # 2**31, exact in int32 whatever the order of the taps.
    def body(t, total):
        column = tf.cast(tf.gather(image, index[:, t], axis=axis), tf.int32)
        return t + 1, total + column * tf.reshape(weights[:, t], broadcast)

    out_shape = tf.tensor_scatter_nd_update(
        tf.shape(image, out_type=tf.int64), [[tf.rank(image) + axis]], [out_size])
    start = tf.fill(out_shape, tf.constant(1 << (_PRECISION_BITS - 1), tf.int32))
    _, total = tf.while_loop(lambda t, _: t < taps, body, (tf.constant(0), start))
    pixels = tf.clip_by_value(tf.bitwise.right_shift(total, _PRECISION_BITS), 0, 255)
    return tf.cast(pixels, tf.uint8)


def _coefficients(in_size: Any, out_size: int):
    """Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for the bilinear
    filter: per output pixel, the first input pixel of each tap (clipped into
    the image) and its fixed-point weight (0 past the filter's support)."""
    import tensorflow as tf

    size = tf.cast(in_size, tf.float64)
    scale = size / out_size
    filterscale = tf.maximum(scale, 1.0)
    support = filterscale  # the triangle's support, 1, widened when shrinking
    taps = tf.cast(tf.math.ceil(support), tf.int64) * 2 + 1
    center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
    # C's (int) of a positive value is its floor; a negative xmin is clipped to 0.
    xmin = tf.maximum(tf.floor(center - support + 0.5), 0.0)
    xmax = tf.minimum(tf.floor(center + support + 0.5), size) - xmin
    x = tf.cast(tf.range(taps), tf.float64)[None, :]
    distance = tf.abs((x + xmin[:, None] - center[:, None] + 0.5)
                      * (1.0 / filterscale))
    w = tf.where((x < xmax[:, None]) & (distance < 1.0), 1.0 - distance, 0.0)
    # The weights' sum in C's order (left to right), so the normalised weights
    # are Pillow's to the last bit.
    total = tf.foldl(lambda acc, column: acc + column, tf.transpose(w),
                     initializer=tf.zeros([out_size], tf.float64))
    k = tf.where(total[:, None] != 0.0, w / total[:, None], w)
    fixed = tf.cast(tf.floor(0.5 + k * 2.0 ** _PRECISION_BITS), tf.int32)
    index = tf.minimum(tf.cast(xmin[:, None] + x, tf.int64), in_size - 1)
    return index, fixed


#: `preprocess_fn`'s compiled functions, one per model input.
_FUNCTIONS: dict[tuple[int, int, int], Any] = {}


def preprocess_fn(height: int, width: int, channels: int):
    """`preprocess` as a `tf.function` for one model input, traced once:
    `fn(scalar string tensor) -> uint8 [height, width, channels]` (a file's
    bytes in; what the folder source calls for each of its images)."""
    import tensorflow as tf

    key = (int(height), int(width), int(channels))
    if key not in _FUNCTIONS:
        _FUNCTIONS[key] = tf.function(
            lambda data: preprocess(data, *key),
            input_signature=[tf.TensorSpec([], tf.string)])
    return _FUNCTIONS[key]
