"""Generic 2D image/mask folders, and the 2D file readers the other loaders share.

Layout (``data.name: folders``)::

    ROOT/images/<stem>.<ext>        training pool (train + val)
    ROOT/masks/<stem>.<ext>         one mask per image, same stem (any of the accepted extensions)
    ROOT/test/images/<stem>.<ext>   optional test set
    ROOT/test/masks/<stem>.<ext>    optional; without it the test images are unlabelled

Accepted extensions: ``.png .jpg .jpeg .tif .tiff .npy``; hidden files and other extensions are
ignored. Masks must be lossless (png/tif/npy, not jpg). Images: grayscale -> 1 channel, RGB -> 3
channels (an alpha channel of a png/jpg/tif read by Pillow is dropped); ``.npy`` images are
``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with ``C <= 4``. All
images must have the same number of channels. Masks are label maps (palette pngs give their indices);
an RGB mask is accepted only if its channels are equal. If every mask holds only the values 0 and
255, 255 means foreground and becomes 1 (a binary mask saved as 0/255); otherwise 255 stays the
ignore index. Masks must agree on the encoding: 0/255 masks mixed with class-index masks, or a
largest label value held by a single mask with unused classes below it (a stray value, e.g. one {0, 1, 7}
among 0/1 masks, when ``n_classes`` is inferred) are errors naming the file. ``options``: ``n_classes`` (default: largest label + 1), ``class_names``,
``test_fraction`` (share of the pool held out as test when there is no ``test/`` folder; default 0.2),
``spacing`` (the pixel size in mm: one number, or [row mm, column mm]; default unknown).
Validation: ``data.val_fraction`` of the remaining pool (default 0.2), fixed seed.
With ``spacing`` HD95, HD and ASSD are in mm and the NSD tolerance is in mm; without it, all are in pixels.
``data.resize: [H, W]`` resizes images bilinearly, masks nearest (the spacing scales with the pixel size).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medxfer.data.base import IGNORE_INDEX, Case, SegmentationData, check_case, check_pixel_count, split_train_val
from medxfer.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.2
MAX_INFERRED_CLASSES = 64  # more inferred classes than this is almost surely a broken mask
_SPLIT_SEED = 0  # fixes the dataset's val/test split; not a run seed
_TEST_SEED = 1


# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by the COVID-QU, IDRiD, ACDC and MSD loaders)
# ----------------------------------------------------------------------------------------------


def require_root(config, dataset: str) -> Path:
    """The dataset folder of ``config``, which must exist."""
    if config.root is None:
        raise DataError(f"dataset {dataset!r}: data.root is required (the folder as distributed)")
    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    return root


def require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: folder not found")
    return path


def take_options(options: dict[str, Any], defaults: dict[str, Any], dataset: str) -> dict[str, Any]:
    """``defaults`` updated by ``options``; an unknown key is an error naming the known ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise DataError(
            f"dataset {dataset!r}: unknown option(s) {unknown}; known: {sorted(defaults)}"
        )
    return {**defaults, **options}


def require_2d(config, dataset: str) -> None:
    if config.spatial_dims != 2:
        raise DataError(f"dataset {dataset!r} is 2D; set data.spatial_dims: 2")


def list_files(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """``stem -> path`` for the files of ``folder`` with one of ``suffixes`` (hidden files skipped);
    two files with one stem are an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            raise DataError(f"{path}: two files with the stem {path.stem!r} (also {found[path.stem].name})")
        found[path.stem] = path
    return found


def read_raster(path: Path) -> tuple[np.ndarray, str]:
    """The array stored in a 2D image file, as stored: ``(H, W)`` or ``(H, W, C)`` (``.npy``: any
    shape). Returns the array and the Pillow mode ("" when Pillow did not read it)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            with open(path, "rb") as f:  # the header first: the shape, before any data is read
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape = read_header(f)[0]
            check_pixel_count(path, _spatial_shape(shape))
            return np.load(path, allow_pickle=False), ""
        except DataError:
            raise
        except Exception as exc:  # truncated, pickled, not an npy file: all "unreadable"
            raise DataError(f"{path}: cannot read npy file: {exc}") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: check_pixel_count says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # reads the header only
        with img:
            check_pixel_count(path, (img.height, img.width))
            img.load()  # decode now: a truncated file fails here, not later
            mode = img.mode
            if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
                mode = "RGB"
            return np.asarray(img), mode
    except Image.DecompressionBombError as exc:  # a header claiming billions of pixels: never decode it
        raise DataError(f"{path}: image too large to read safely ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as pil_exc:
        if path.suffix.lower() in (".tif", ".tiff"):
            try:  # float / many-channel tifs Pillow cannot open
                import tifffile

                with tifffile.TiffFile(path) as tif:
                    shape = tif.series[0].shape  # from the header
                    check_pixel_count(path, _spatial_shape(shape))
                    return np.asarray(tif.asarray()), ""
            except DataError:
                raise
            except Exception:
                pass
        raise DataError(f"{path}: cannot read image: {pil_exc}") from None


def _spatial_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The spatial axes of an array as ``read_raster`` returns it: a channel axis (<= 4 long, first or last
    of a 3-axis array) left out."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3 and shape[-1] <= 4:
        return shape[:-1]
    if len(shape) >= 3 and shape[0] <= 4:
        return shape[1:]
    return shape


def read_image_2d(path: Path) -> np.ndarray:
    """A 2D image file as float32 ``(C, H, W)``."""
    array, mode = read_raster(path)
    if mode == "P":
        from PIL import Image

        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
        mode = "RGB"
    if array.ndim == 2:
        image = array[None]
    elif array.ndim == 3:
        if mode in ("RGBA", "LA"):  # alpha is transparency, not signal
            array = array[..., :-1]
        if mode or array.shape[-1] <= 4:  # Pillow arrays are always channels-last
            image = np.moveaxis(array, -1, 0)
        elif array.shape[0] <= 4:
            image = array
        else:
            raise DataError(f"{path}: cannot tell the channel axis of an image of shape {array.shape}")
    else:
        raise DataError(f"{path}: expected a 2D image (H, W) or (H, W, C), got shape {array.shape}")
    if array.dtype == bool:
        image = image.astype(np.uint8)
    return np.ascontiguousarray(image, dtype=np.float32)


def as_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer label values as int64; non-integer values are an error naming ``path``."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{path}: mask contains NaN or inf values")
        if not np.array_equal(array, np.round(array)):
            raise DataError(f"{path}: mask contains non-integer values")
    elif not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: mask has unsupported dtype {array.dtype}")
    return array.astype(np.int64)


def read_mask_2d(path: Path) -> np.ndarray:
    """A label-map file as int64 ``(H, W)``: one channel, or several identical channels."""
    array, mode = read_raster(path)
    if array.ndim == 3:
        if mode in ("RGBA", "LA"):
            array = array[..., :-1]
        axis = -1 if (mode or array.shape[-1] <= 4) else 0
        first = np.take(array, 0, axis=axis)
        if not all(np.array_equal(first, np.take(array, i, axis=axis)) for i in range(1, array.shape[axis])):
            raise DataError(f"{path}: mask has differing colour channels; store class indices (0, 1, ...)")
        array = first
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2D mask, got shape {array.shape}")
    return as_label_array(array, path)


def resize_case_arrays(
    image: np.ndarray,
    label: Optional[np.ndarray],
    size: Sequence[int],
    spacing: Optional[tuple[float, ...]],
) -> tuple[np.ndarray, Optional[np.ndarray], Optional[tuple[float, ...]]]:
    """Resize ``image`` (C, *S) linearly (anti-aliased when shrinking) and ``label`` (*S) nearest to
    ``size``; the spacing scales with the pixel size."""
    from skimage.transform import resize

    spatial = tuple(image.shape[1:])
    size = tuple(int(s) for s in size)
    if len(size) != len(spatial) or min(size) < 1:
        raise ConfigError(
            f"data.resize: expected {len(spatial)} positive sizes for {len(spatial)}D images, got {list(size)}"
        )
    if size == spatial:
        return image, label, spacing
    image = np.stack([resize(ch, size, order=1, preserve_range=True) for ch in image]).astype(np.float32)
    if label is not None:
        label = resize(label, size, order=0, preserve_range=True, anti_aliasing=False).astype(np.int64)
    if spacing is not None:
        spacing = tuple(float(s) * old / new for s, old, new in zip(spacing, spatial, size))
    return image, label, spacing


# ----------------------------------------------------------------------------------------------
# The folders loader
# ----------------------------------------------------------------------------------------------


def _pairs(images_dir: Path, masks_dir: Optional[Path]) -> list[tuple[str, Path, Optional[Path]]]:
    images = list_files(images_dir)
    if masks_dir is None:
        return [(stem, path, None) for stem, path in images.items()]
    masks = list_files(masks_dir)
    for stem, path in images.items():
        if stem not in masks:
            raise DataError(f"{path}: no mask with the stem {stem!r} in {masks_dir}")
    for stem, path in masks.items():
        if stem not in images:
            raise DataError(f"{path}: no image with the stem {stem!r} in {images_dir}")
    return [(stem, path, masks[stem]) for stem, path in images.items()]


def _values_text(values: set[int]) -> str:
    return "{" + ", ".join(str(v) for v in sorted(values)) + "}"


def check_mask_encoding(mask_values: dict[Path, set[int]], n_classes: Optional[int]) -> None:
    """Every mask must encode classes the same way; a mixture silently turns foreground into "ignore".

    Two encodings are told apart: binary 0/255 (values within {0, 255}, 255 present) and class indices
    (values 1..254). Mixing them is an error unless some mask holds 255 *beside* class indices (then 255
    is the ignore index throughout). With ``n_classes`` inferred, the largest value is a stray one when a
    single mask holds it and classes below it occur in no mask (e.g. one {0, 1, 7} among 0/1 masks).
    """
    binary_255 = [p for p, v in mask_values.items() if 255 in v and v <= {0, 255}]
    indexed = [p for p, v in mask_values.items() if v - {0, IGNORE_INDEX}]
    ignore_used = any(IGNORE_INDEX in mask_values[p] for p in indexed)
    if binary_255 and indexed and not ignore_used:
        odd, usual = (binary_255, indexed) if len(binary_255) <= len(indexed) else (indexed, binary_255)
        raise DataError(
            f"{odd[0]}: mask values {_values_text(mask_values[odd[0]])}, but {len(usual)} other mask(s) such as "
            f"{usual[0].name} hold {_values_text(mask_values[usual[0]])}: masks mix a 0/255 and a class-index "
            "encoding (255 would become 'ignore' and drop that foreground); store every mask one way"
        )
    if n_classes is not None:
        return
    used = set().union(*mask_values.values()) - {IGNORE_INDEX} if mask_values else set()
    stray = max(used, default=0)
    missing = sorted(set(range(stray + 1)) - used)
    holders = [p for p, v in mask_values.items() if stray in v]
    # (values beyond MAX_INFERRED_CLASSES get the lossy-mask error of the caller instead)
    if missing and not binary_255 and len(holders) == 1 and len(mask_values) >= 3 and stray < MAX_INFERRED_CLASSES:
        path = holders[0]
        raise DataError(
            f"{path}: mask value {stray}, but no mask holds class(es) {missing}: a stray label value would make "
            f"{stray + 1} classes; masks must hold class indices 0..n-1, or set options.n_classes"
        )


def _pixel_spacing(value: Any) -> Optional[tuple[float, float]]:
    """``options.spacing``: the pixel size in mm, one number (square pixels) or [rows, columns]; None = unknown."""
    if value is None:
        return None
    values = [value, value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        spacing = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 2 or not all(np.isfinite(v) and v > 0 for v in spacing):
        raise DataError(f"dataset 'folders': options.spacing must be a positive number or [row mm, column mm], "
                        f"got {value!r}")
    return spacing  # type: ignore[return-value]


def load_folders(config) -> SegmentationData:
    """Loader entry point for ``data.name: folders`` (a :class:`medxfer.config.DataConfig`)."""
    require_2d(config, "folders")
    root = require_root(config, "folders")
    opts = take_options(
        config.options, {"n_classes": None, "class_names": None, "test_fraction": None, "spacing": None}, "folders"
    )
    pixel_spacing = _pixel_spacing(opts["spacing"])
    pool_pairs = _pairs(require_dir(root / "images"), require_dir(root / "masks"))
    if not pool_pairs:
        raise DataError(f"{root / 'images'}: empty dataset: no images ({', '.join(IMAGE_SUFFIXES)})")
    test_dir = root / "test" / "images"
    test_pairs: list[tuple[str, Path, Optional[Path]]] = []
    has_test = test_dir.is_dir()
    if (root / "test").is_dir() and not has_test:
        raise DataError(f"{root / 'test'}: a test folder needs test/images (and test/masks)")
    if has_test:
        if opts["test_fraction"] is not None:
            raise DataError(f"{root / 'test'}: options.test_fraction conflicts with the dataset's own test folder")
        masks_dir = root / "test" / "masks"
        test_pairs = _pairs(test_dir, masks_dir if masks_dir.is_dir() else None)
        if not masks_dir.is_dir():
            log.warning("%s: no test/masks folder; the test images are unlabelled", root)

    raw_masks = {path: read_mask_2d(path) for _, _, path in pool_pairs + test_pairs if path is not None}
    mask_values = {path: {int(v) for v in np.unique(mask)} for path, mask in raw_masks.items()}
    values = set().union(*mask_values.values())
    n_classes_opt = opts["n_classes"]
    check_mask_encoding(mask_values, n_classes_opt)
    binary_255 = 255 in values and values <= {0, 255} and n_classes_opt in (None, 2)
    if binary_255:
        log.info("%s: masks hold only 0/255; reading 255 as class 1", root)
    if n_classes_opt is None:
        n_classes = max([v for v in values if v != IGNORE_INDEX] + [0]) + 1
        n_classes = 2 if binary_255 else max(n_classes, 2)
        if n_classes > MAX_INFERRED_CLASSES:  # a lossy (jpg) or intensity image among the masks
            worst = max(raw_masks, key=lambda p: int(np.where(raw_masks[p] == IGNORE_INDEX, 0, raw_masks[p]).max()))
            raise DataError(
                f"{worst}: label value {n_classes - 1} would make {n_classes} classes; masks must be lossless "
                f"class indices (png/tif/npy), or set options.n_classes"
            )
    else:
        n_classes = int(n_classes_opt)
        if n_classes < 2:
            raise DataError(f"dataset 'folders': options.n_classes must be >= 2, got {n_classes}")
    class_names = opts["class_names"]
    if class_names is None:
        class_names = ["background"] + [f"class{k}" for k in range(1, n_classes)]
    elif len(class_names) != n_classes:
        raise DataError(
            f"dataset 'folders': options.class_names has {len(class_names)} names for {n_classes} classes"
        )

    def build(pairs, split: str) -> list[Case]:
        cases = []
        for stem, image_path, mask_path in pairs:
            image = read_image_2d(image_path)
            label = None
            if mask_path is not None:
                label = raw_masks[mask_path]
                if binary_255:
                    label = (label == 255).astype(np.int64)
            spacing = pixel_spacing
            if config.resize is not None:
                image, label, spacing = resize_case_arrays(image, label, config.resize, spacing)
            case = Case(
                image=image,
                label=label,
                case_id=stem if split == "pool" else f"test_{stem}",
                spacing=spacing,
                meta={"image_path": str(image_path), "label_path": str(mask_path) if mask_path else None,
                      "group": stem},
            )
            check_case(case, str(image_path), n_classes, label_source=str(mask_path) if mask_path else None)
            cases.append(case)
        return cases

    pool = build(pool_pairs, "pool")
    test = build(test_pairs, "test")
    channels = {c.image.shape[0] for c in pool + test}
    if len(channels) > 1:
        first = pool[0].image.shape[0]
        odd = next(c for c in pool + test if c.image.shape[0] != first)
        raise DataError(
            f"{odd.meta['image_path']}: {odd.image.shape[0]} channel(s), but {pool[0].meta['image_path']} has {first}"
        )
    if not has_test:
        fraction = DEFAULT_TEST_FRACTION if opts["test_fraction"] is None else float(opts["test_fraction"])
        if not 0.0 <= fraction < 1.0:
            raise DataError(f"dataset 'folders': options.test_fraction must be in [0, 1), got {fraction}")
        pool, test = split_train_val(pool, fraction, seed=_TEST_SEED)
    val_fraction = DEFAULT_VAL_FRACTION if config.val_fraction is None else config.val_fraction
    train, val = split_train_val(pool, val_fraction, seed=_SPLIT_SEED)
    return SegmentationData(
        name="folders",
        train=train,
        val=val,
        test=test,
        n_classes=n_classes,
        class_names=list(class_names),
        in_channels=channels.pop(),
        spatial_dims=2,
        meta={"root": str(root), "masks_0_255": binary_255, "test_from": "test/" if has_test else "held out"},
    )
