"""Apply a trained model to new images or volumes: ``predict(run_or_model, inputs, out_dir)``.

Inputs: one file or a folder of files (not recursive): ``.png .jpg .jpeg .tif .tiff .npy`` are 2D images
(read as the ``folders`` loader reads them), ``.nii`` / ``.nii.gz`` are volumes (read as the ``msd``
loader reads them; a 2D model segments them slice by slice), and ``.tif``/``.npy`` holding a
``(D, H, W)`` array are volumes when the model is 3D. Preprocessing is the run's own: normalisation,
percentile clip, resize, patch size (sliding-window inference) and threshold come from the run's
``result.json`` (its resolved config), else from the ``data`` entry of the model manifest, else from the
defaults (with a warning).

Outputs, per input ``<stem>``: ``<stem>_mask.<ext>`` holding class indices (0 = background, uint8) in the
input's format (PNG for png/jpg, TIFF for tif, npy for npy, NIfTI with the input's affine, header and
voxel axes for NIfTI; PNG masks are scaled to be visible in an image viewer: class k is written as
``k * png_scale`` with ``png_scale = 255 // (n_classes - 1)``, so a binary mask is 0/255; the summary records
``png_scale``) and ``<stem>_overlay.png`` (contours per class; for a volume the slice with most
foreground), plus ``predict_summary.json`` (per input: its spacing in mm when the file has one, and
whether it lies outside the training data's spacing, which is then also logged as a warning with both).
A file that cannot be read or predicted, for whatever reason, is logged, listed with the reason under
``failed`` in the summary and skipped; the other files are still written.
"""

from __future__ import annotations

import gzip
import io
import logging
import threading
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import numpy as np
import tifffile
from PIL import Image

from medxfer.data.folders import read_image_2d, read_raster
from medxfer.data.msd import read_nifti
from medxfer.errors import DataError, MedxferError
from medxfer.inference import (label_map, load_trained_model, preprocessing_from_record, probabilities,
                                spacing_mismatch, spacing_of_run)
from medxfer.io import atomic_write_bytes, atomic_write_json
from medxfer.report.overlays import overlay_figure
from medxfer.report.plots import png_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES_2D = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


# ----------------------------------------------------------------------------------------- the inputs
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if _suffix(path) == ".nii.gz" else path.stem


def list_inputs(inputs: str | Path) -> list[Path]:
    """The input file, or the supported files of a folder (sorted, hidden files skipped)."""
    inputs = Path(inputs)
    if inputs.is_file():
        return [inputs]
    if not inputs.is_dir():
        raise DataError(f"{inputs}: input file or folder not found")
    files = [p for p in sorted(inputs.iterdir()) if p.is_file() and not p.name.startswith(".")
             and _suffix(p) in IMAGE_SUFFIXES_2D + NIFTI_SUFFIXES]
    if not files:
        raise DataError(f"{inputs}: no image file (.png .jpg .tif .npy .nii .nii.gz) in the folder")
    return files


def read_input(path: Path, spatial_dims: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One input file as float32 ``(C, *S)`` plus what writing its mask needs (format, NIfTI header).

    NIfTI volumes follow the dataset loaders' axes (``medxfer.data.msd``: ``[i, j, k]`` -> ``(D, H, W) =
    (k, j, i)``); a 2D model segments them slice by slice along D, as it was trained on ACDC-style slices.
    """
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        image, spacing = read_nifti(path)
        volume = nib.load(str(path))
        if not np.isfinite(volume.affine).all():  # its mask could not be placed in space (nor written)
            raise DataError(f"{path}: the NIfTI affine holds NaN or infinite values")
        meta = {"format": "nifti", "nifti": volume, "slicewise": spatial_dims == 2, "spacing": list(spacing)}
        return image, meta
    if spatial_dims == 3:
        array, _ = read_raster(path)
        array = np.asarray(array, dtype=np.float32)
        if array.ndim == 3:
            image = array[None]
        elif array.ndim == 4 and array.shape[0] <= 4:
            image = array
        else:
            raise DataError(f"{path}: a 3D model takes a (D, H, W) or (C, D, H, W) volume, got shape {array.shape}")
        meta = {"format": "tiff" if suffix in (".tif", ".tiff") else "npy" if suffix == ".npy" else "png"}
    else:
        image = read_image_2d(path)
        meta = {"format": {".tif": "tiff", ".tiff": "tiff", ".npy": "npy"}.get(suffix, "png")}
    if not np.isfinite(image).all():
        raise DataError(f"{path}: image contains NaN or inf values")
    return np.ascontiguousarray(image, dtype=np.float32), meta


def _fit_channels(image: np.ndarray, in_channels: int, path: Path, colour: bool) -> np.ndarray:
    """The image with the model's channels; ``colour``: the channels are an RGB(A) picture's, which a grey
    model sees averaged. Several volumes in one file (a 4D NIfTI, a (C, D, H, W) array) are refused: their
    mean is no image the model was trained on."""
    if image.shape[0] == in_channels or image.shape[0] == 1:
        return image  # equal, or grey repeated to the model's channels by match_channels
    if not colour:
        raise DataError(f"{path}: the file holds {image.shape[0]} volumes (a 4D image); the model takes "
                        f"{in_channels} channel(s): split it into one file per volume")
    if in_channels == 1:
        log.info("%s: %d channels averaged to grey for a 1-channel model", path, image.shape[0])
        return image.mean(axis=0, keepdims=True)
    raise DataError(f"{path}: image has {image.shape[0]} channels, the model takes {in_channels}")


def png_scale(n_classes: int) -> int:
    """Factor PNG masks are multiplied by so that classes are visible grey levels (binary: 0/255)."""
    return max(1, 255 // max(1, n_classes - 1))


def _mask_bytes(mask: np.ndarray, meta: dict[str, Any], path: Path) -> tuple[bytes, str, tuple[int, ...]]:
    """The encoded mask file, its suffix and the shape stored in it, in the input's format."""
    buffer = io.BytesIO()
    kind = meta["format"]
    if kind == "nifti":
        source = meta["nifti"]
        voxels = mask.transpose(2, 1, 0)  # (D, H, W) -> the file's [i, j, k]
        if len(source.shape) == 2:
            voxels = voxels[..., 0]
        header = source.header.copy()
        header.set_data_dtype(mask.dtype)
        image = nib.Nifti1Image(voxels, source.affine, header)
        image.header.set_slope_inter(1, 0)
        data = image.to_bytes()
        gz = _suffix(path) == ".nii.gz"
        return (gzip.compress(data) if gz else data), (".nii.gz" if gz else ".nii"), voxels.shape
    if kind == "tiff":
        tifffile.imwrite(buffer, mask)
        return buffer.getvalue(), ".tif", mask.shape
    if kind == "npy":
        np.save(buffer, mask, allow_pickle=False)
        return buffer.getvalue(), ".npy", mask.shape
    scale = png_scale(int(meta.get("n_classes", 2)))
    visible = mask.astype(np.uint16) * scale if scale > 1 else mask
    # png also for jpg inputs: masks must be lossless
    Image.fromarray(visible.astype(np.uint8 if int(visible.max(initial=0)) <= 255 else np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue(), ".png", mask.shape


# -------------------------------------------------------------------------------------------- predict
def _mm(values) -> str:
    return "[" + ", ".join(f"{float(v):.3g}" for v in values) + "]"


def _start_warm_up(model, settings: dict[str, Any]) -> Optional[threading.Thread]:
    """Sliding-window models: import MONAI and set up the window's kernels in a background thread while
    the first input is read (a fresh process's first window call cost 10x the next: medxfer.data.patches)."""
    if not settings.get("patch_size"):
        return None
    from medxfer.data.patches import warm_up

    def run() -> None:
        try:
            warm_up(model, settings["patch_size"], int(max(model.encoder.strides)), settings["sw_batch_size"],
                    model.encoder.in_channels)
        except Exception as exc:  # only a head start: the real call reports any real problem
            log.debug("warm-up skipped: %s", exc)

    thread = threading.Thread(target=run, name="medxfer-warm-up", daemon=True)
    thread.start()
    return thread


VOXEL_AXES = ("i", "j", "k")
PLANES = {"sagittal": ("L", "R"), "coronal": ("A", "P"), "axial": ("S", "I")}


def slice_axis(axis: Optional[str], volume: Any) -> tuple[int, str]:
    """The voxel axis (0, 1, 2 = i, j, k of the file) a 2D model slices a volume along, and its plane from the
    affine (``axial``/``coronal``/``sagittal``). ``axis``: ``i``/``j``/``k``, a plane name, or None = k (the
    third voxel axis: the slices of ACDC/MSD-style volumes)."""
    codes = nib.aff2axcodes(volume.affine)
    planes = [next((name for name, letters in PLANES.items() if code in letters), "unknown") for code in codes]
    if axis is None:
        index = 2
    elif str(axis).lower() in VOXEL_AXES:
        index = VOXEL_AXES.index(str(axis).lower())
    elif str(axis).lower() in PLANES:
        if str(axis).lower() not in planes:
            raise DataError(f"no voxel axis of the volume is {axis} (its axes are {', '.join(planes)})")
        index = planes.index(str(axis).lower())
    else:
        raise DataError(f"--axis {axis!r}: one of i, j, k (voxel axes of the file) or axial, coronal, sagittal")
    return index, planes[index]


def _geometry_warnings(path: Path, slice_shape: tuple[int, ...], plane: Optional[str],
                       trained: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Why the model may not see what it was trained on: a slice shape or plane other than the training data's."""
    problems = []
    shapes = [tuple(s) for s in trained.get("train_shapes") or []]
    if shapes and not settings.get("resize") and not settings.get("patch_size") and tuple(slice_shape) not in shapes:
        problems.append(f"slices are {'x'.join(map(str, slice_shape))} pixels, the training images were "
                        f"{', '.join('x'.join(map(str, s)) for s in shapes)}")
    orientation = trained.get("slice_orientation")
    if plane and orientation and plane != "unknown" and plane != orientation:
        problems.append(f"slices are {plane}, the model was trained on {orientation} slices (set --axis)")
    for problem in problems:
        log.warning("%s: %s", path, problem)
    return problems


def predict(model_path_or_run_dir: str | Path, inputs: str | Path, out_dir: str | Path, *,
            overlays: bool = True, axis: Optional[str] = None) -> dict[str, Any]:
    """Segment every input with a trained model; write masks, overlays and ``predict_summary.json``.

    ``axis``: for a 2D model on a volume, the voxel axis (``i``/``j``/``k``) or plane (``axial``, ``coronal``,
    ``sagittal``, from the file's affine) to slice along; default ``k``, the third voxel axis. Each entry of
    the summary records the axis and plane used, and any slice shape or plane that differs from training
    (also logged as a warning).

    Returns the summary: ``model``, ``settings`` (the preprocessing used and where it came from),
    ``written`` (input, mask, overlay, shape per file), ``failed`` (input, error per file), ``out_dir``.
    """
    model, info = load_trained_model(model_path_or_run_dir)
    trained = {key: (info["record"] or {}).get(key) or (info["manifest"] or {}).get(key)
               for key in ("train_shapes", "slice_orientation", "class_names")}
    settings = preprocessing_from_record(info["record"], info["manifest"])
    if settings["source"] == "defaults":
        log.warning("%s: no result.json or preprocessing manifest beside the model; using default "
                    "preprocessing (%s normalisation, no resize)", info["model_path"], settings["normalization"])
    trained_spacing = spacing_of_run(info["record"], info["manifest"])
    spatial_dims = int(model.spatial_dims)
    warming = _start_warm_up(model, settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list_inputs(inputs)
    mask_dtype = np.uint8 if model.n_classes <= 256 else np.uint16
    written, failed = [], []
    stems = [_stem(p) for p in files]
    for path, stem in zip(files, stems):
        if stems.count(stem) > 1:  # a.png and a.jpg: keep the outputs apart
            stem = path.name.replace(".", "_")
        try:
            image, meta = read_input(path, spatial_dims)
            spacing = meta.get("spacing")
            mismatch = bool(spacing and trained_spacing and settings.get("plan") is None
                            and spacing_mismatch(spacing, trained_spacing))  # a plan resamples it anyway
            if mismatch:
                # medxfer trains at the data's own spacing (no fixed-spacing option), so there is no
                # training spacing to resample to: say so, with both spacings
                log.warning("%s: voxel spacing %s mm differs from the training data's %s mm (range %s..%s); the "
                            "model sees structures at another scale: resample the input to the training spacing",
                            path, _mm(spacing), _mm(trained_spacing["median"]), _mm(trained_spacing["min"]),
                            _mm(trained_spacing["max"]))
            image = _fit_channels(image, model.encoder.in_channels, path,
                                  colour=meta["format"] != "nifti" and image.ndim == 3)
            if warming is not None:  # the first input was read meanwhile
                warming.join()
                warming = None
            geometry: dict[str, Any] = {}
            if meta.get("slicewise"):
                index, plane = slice_axis(axis, meta["nifti"])
                along = 3 - index  # the array is (C, D, H, W) = (C, k, j, i)
                slices = np.moveaxis(image, along, 1)
                geometry = {"slice_axis": VOXEL_AXES[index], "slice_plane": plane,
                            "geometry_warnings": _geometry_warnings(path, slices.shape[2:], plane, trained, settings)}
                mask = np.stack([label_map(probabilities(model, slices[:, d], settings), settings["threshold"])
                                 for d in range(slices.shape[1])]).astype(mask_dtype)
                mask = np.moveaxis(mask, 0, along - 1)
            elif image.ndim != spatial_dims + 1:
                raise DataError(f"{path}: a {spatial_dims}D model cannot take an image of shape {image.shape}")
            else:
                if spatial_dims == 2:
                    geometry = {"geometry_warnings": _geometry_warnings(path, image.shape[1:], None, trained,
                                                                        settings)}
                mask = label_map(probabilities(model, image, settings, spacing),
                                 settings["threshold"]).astype(mask_dtype)
            data, suffix, stored_shape = _mask_bytes(mask, {**meta, "n_classes": model.n_classes}, path)
            mask_path = out_dir / f"{stem}_mask{suffix}"
            atomic_write_bytes(mask_path, data)
            entry = {"input": str(path), "mask": str(mask_path), "shape": list(stored_shape),
                     "foreground_fraction": float((mask > 0).mean()), "spacing": spacing,
                     "spacing_mismatch": mismatch, **geometry}
            if overlays:
                overlay_path = out_dir / f"{stem}_overlay.png"
                shown = (np.moveaxis(image, 3 - VOXEL_AXES.index(geometry["slice_axis"]), 1),
                         np.moveaxis(mask, 2 - VOXEL_AXES.index(geometry["slice_axis"]), 0)) \
                    if geometry.get("slice_axis") else (image, mask)
                atomic_write_bytes(overlay_path, png_bytes(overlay_figure(*shown, model.n_classes, path.name,
                                                                          class_names=trained["class_names"])))
                entry["overlay"] = str(overlay_path)
            written.append(entry)
        except Exception as exc:  # any per-file failure skips that file only; KeyboardInterrupt still stops
            why = str(exc) if isinstance(exc, MedxferError) else f"{type(exc).__name__}: {exc}"
            log.error("%s: skipped: %s", path, why)
            failed.append({"input": str(path), "error": " ".join(why.split())})
    summary = {"model": info["model_path"], "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                                           for k, v in settings.items()},
               "train_spacing": trained_spacing,
               "png_scale": png_scale(model.n_classes),
               "out_dir": str(out_dir), "written": written, "failed": failed}
    atomic_write_json(out_dir / "predict_summary.json", summary)
    log.info("predict: %d mask(s) written to %s, %d input(s) failed", len(written), out_dir, len(failed))
    return summary
