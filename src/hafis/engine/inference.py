"""Using a trained model on images nobody labelled: the :class:`Predictor` API and ``hafis predict``.

The network is the one the run's evaluation reports (the checkpoint's ``model`` entry: a mean teacher's teacher once
it has had an EMA update, the student otherwise); ``network='student'`` or ``'teacher'`` picks one. Inference is
:func:`hafis.engine.evaluation.predict` with the config's ``eval`` settings (whole image or sliding window), on the
same normalisation as evaluation, so a predicted mask is the one ``hafis eval`` scores.

Images are taken as they are displayed: EXIF orientation applied, grey / palette / RGBA / CMYK / 16-bit converted to
8-bit RGB (:func:`hafis.data.io.photo_array`). Masks are written at the input's own size as palette PNGs of class ids
(:func:`palette`), so they read back as ids and look right in any viewer.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path, PurePath
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from hafis.config import Config, ConfigError, config_changes, load_config
from hafis.data.io import IMAGE_EXTENSIONS, photo_array, photo_size
from hafis.data.transforms import normalize
from hafis.errors import short
from hafis.files import atomic_write, write_json

from .build import build_model, resolve_device
from .checkpoint import CheckpointError, load_checkpoint, load_module_state
from .evaluation import eval_settings, predict

__all__ = ["NETWORKS", "Predictor", "checked_class_names", "collect_inputs", "load_trained_model", "palette",
           "predict_files"]

#: ``--network``: which network of a mean-teacher checkpoint to use (default: the one its evaluation reports)
NETWORKS = ("student", "teacher")
#: exceptions Pillow raises for a file it cannot decode
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# ------------------------------------------------------------------------------------------------- the network
def select_weights(state: dict, network: Optional[str], path: Union[str, Path]) -> dict:
    """The state dict of the chosen network of a checkpoint (see the module docstring)."""
    from hafis.models.deeplabv3plus import is_unimatch_state_dict, unimatch_state_dict

    if network is None:
        weights = state["model"]
    elif network == "student":
        if "student" not in state:
            raise CheckpointError(f"checkpoint {path} has no 'student' entry; leave --network out")
        weights = state["student"]
    elif network == "teacher":
        framework_state = state.get("framework")
        teacher = framework_state.get("teacher") if isinstance(framework_state, dict) else None
        if not isinstance(teacher, dict):
            train = (state.get("config") or {}).get("train")
            framework = train.get("framework", "?") if isinstance(train, dict) else "?"
            raise ConfigError(f"--network teacher: checkpoint {path} (framework {framework!r}) has no teacher; "
                              "mean-teacher frameworks (u2pl, ael, augseg) have one")
        prefix = "segmenter."  # U2PL's teacher carries its representation head beside the segmenter
        if any(k.startswith(prefix) for k in teacher):
            teacher = {k[len(prefix):]: v for k, v in teacher.items() if k.startswith(prefix)}
        weights = teacher
    else:
        raise ConfigError(f"--network must be one of {', '.join(NETWORKS)}, got {network!r}")
    if not isinstance(weights, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise CheckpointError(f"checkpoint {path}: the {network or 'model'} entry is not a mapping of parameter names "
                              f"to tensors")
    if is_unimatch_state_dict(weights):  # a UniMatch-released checkpoint (``{'model': DDP state dict, ...}``)
        weights = unimatch_state_dict(weights)
    return weights


def load_trained_model(config: Config, checkpoint: Union[str, Path], network: Optional[str] = None,
                       num_classes: Optional[int] = None) -> tuple[nn.Module, dict, int]:
    """``(model in eval mode, checkpoint state, classes)``: the config's segmenter with the checkpoint's weights.

    ``num_classes`` defaults to the checkpoint classifier's output count, so no dataset needs to be at hand.
    ImageNet initialisation is skipped (every weight comes from the checkpoint, and nothing is downloaded).
    A checkpoint of another model config is a :class:`CheckpointError` naming the keys that differ.
    """
    state = load_checkpoint(Path(checkpoint))
    weights = select_weights(state, network, checkpoint)
    if config.model.decoder == "released":  # U2PL / AEL names (a hafis checkpoint's pass through unchanged)
        from hafis.models.released import released_state_dict

        weights = released_state_dict(weights)
    if num_classes is None:
        # the last convolution of the ``classifier`` (a layer, or the released decoder's sequence) gives one map a class
        found = [v for k, v in weights.items() if "classifier" in k.split(".") and k.endswith(".weight")
                 and torch.is_tensor(v) and v.dim() == 4]
        if found:
            num_classes = int(found[-1].shape[0])
        else:  # a segmenter without a ``classifier``: the dataset says
            from hafis.data import build_sources

            num_classes = build_sources(config.data)[2].num_classes
    bare = dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=None,
                                                                 pretrained_path=None))
    torch.manual_seed(config.seed)
    model = build_model(bare, num_classes)
    try:
        load_module_state(model, weights, f"checkpoint {checkpoint}")
    except CheckpointError as exc:
        changed = {k: v for k, v in config_changes(state.get("config"), config).items() if k.startswith("model.")}
        hint = "; ".join(f"{k}: {short(old)} in the checkpoint, {short(new)} here" for k, (old, new) in changed.items()
                         if state.get("config"))
        raise CheckpointError(f"{exc}" + (f" (config differs: {hint})" if hint else "")) from None
    return model.eval(), state, num_classes


def checked_class_names(config: Config, state: dict, num_classes: int, checkpoint: Union[str, Path]) -> list[str]:
    """The names of the checkpoint's ``num_classes`` outputs: the config's dataset's (:func:`hafis.data.class_names`),
    which must agree with the checkpoint in count and, where the checkpoint records them (``class_names``), in
    names, or a :class:`CheckpointError` says which differ; where the dataset's names are not at hand, the
    checkpoint's own; ``class 0`` ... only for a checkpoint without names and a dataset without a class list."""
    from hafis.data import class_names

    names = list(class_names(config.data))
    saved = state.get("class_names")
    saved = list(saved) if isinstance(saved, (list, tuple)) and all(isinstance(n, str) for n in saved) else []
    advice = "use the config the checkpoint was trained with"
    if saved and len(saved) != num_classes:
        raise CheckpointError(f"checkpoint {checkpoint} names {len(saved)} classes but predicts {num_classes}")
    if names and len(names) != num_classes:
        raise CheckpointError(f"checkpoint {checkpoint} predicts {num_classes} classes"
                              + (f" ({short(saved)})" if saved else "") + f", but the config's dataset "
                              f"({config.data.dataset}) has {len(names)} ({short(names)}); {advice}")
    if names and saved and names != saved:
        i = next(i for i, (a, b) in enumerate(zip(saved, names, strict=True)) if a != b)
        raise CheckpointError(f"checkpoint {checkpoint} was trained on other classes than the config's dataset "
                              f"({config.data.dataset}) names: class {i} is {saved[i]!r} in the checkpoint, "
                              f"{names[i]!r} here; {advice}")
    return names or saved or [f"class {i}" for i in range(num_classes)]


def palette(dataset: str) -> list[int]:
    """Flat RGB palette of 256 colours for a mask PNG: Cityscapes' train-id colours for Cityscapes, the VOC colour
    map for VOC and every other dataset (distinct colours for all 256 ids)."""
    from hafis.data.voc import voc_palette

    flat = voc_palette()
    if dataset == "cityscapes":
        from hafis.data.cityscapes import TRAIN_ID_COLOURS

        head = [c for rgb in TRAIN_ID_COLOURS for c in rgb]
        flat = head + flat[len(head):]
    return flat


# ------------------------------------------------------------------------------------------------ the API
class Predictor:
    """A trained segmenter that takes images as they come: ``mask = predictor(image)``.

    ``image``: a PIL image (EXIF orientation applied, any mode converted), an ``(H, W, 3)`` (or ``(H, W)`` grey)
    uint8 array, or an RGB tensor ``(3, H, W)`` / ``(B, 3, H, W)``, uint8 0-255 or float 0-1, not normalised.
    Returns the ``(H, W)`` class ids: a uint8 numpy array for PIL / numpy input, an int64 tensor (``(B, H, W)`` for
    a batch) for tensor input.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, mode: str = "whole", window: Optional[int] = None,
                 stride: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                 class_names: Optional[Sequence[str]] = None, palette: Optional[list[int]] = None) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.num_classes = num_classes
        self.mode, self.window, self.stride = mode, window, stride
        self.class_names = list(class_names) if class_names and len(class_names) == num_classes else [
            f"class {i}" for i in range(num_classes)]
        self.palette = palette

    @classmethod
    def from_run(cls, config: Union[str, Path, Config], checkpoint: Union[str, Path], *,
                 network: Optional[str] = None, device: Optional[str] = None, mode: Optional[str] = None,
                 window: Optional[int] = None, overrides: Sequence[str] = ()) -> "Predictor":
        """The network of a run: its YAML config (path with ``key=value`` overrides, or a loaded
        :class:`~hafis.config.Config`) and a checkpoint. ``mode`` / ``window`` override ``eval.mode`` /
        ``eval.window``; ``device`` overrides ``train.device``."""
        if not isinstance(config, Config):
            config = load_config(config, list(overrides))
        if mode is not None or window is not None:
            config = dataclasses.replace(config, eval=dataclasses.replace(
                config.eval, mode=config.eval.mode if mode is None else mode,
                window=config.eval.window if window is None else window))
        if config.eval.mode not in ("whole", "sliding"):
            raise ConfigError(f"--mode must be whole or sliding, got {config.eval.mode!r}")
        if config.eval.window is not None and config.eval.window < 1:
            raise ConfigError(f"--window must be a positive number of pixels, got {config.eval.window}")
        model, state, num_classes = load_trained_model(config, checkpoint, network)
        names = checked_class_names(config, state, num_classes, checkpoint)
        return cls(model, num_classes, **eval_settings(config),
                   device=resolve_device(device or config.train.device), class_names=names,
                   palette=palette(config.data.dataset))

    @torch.no_grad()
    def scores(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` class scores (logits, or mean probabilities when sliding) of uint8 ``(B, 3, H, W)``."""
        return predict(self.model, normalize(images).to(self.device), self.mode, self.window, self.stride)

    @torch.no_grad()
    def predict_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(masks (B, H, W) int64, top-class probability (B, H, W))`` of uint8 ``(B, 3, H, W)`` on the CPU."""
        scores = self.scores(images)
        probs = scores.softmax(dim=1) if self.mode == "whole" else scores
        return scores.argmax(dim=1).cpu(), probs.amax(dim=1).cpu()

    def __call__(self, image: Any) -> Union[np.ndarray, Tensor]:
        if torch.is_tensor(image):
            batch = image if image.dim() == 4 else image[None]
            if batch.dim() != 4 or batch.shape[1] != 3:
                raise ValueError(f"expected an RGB tensor (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
            if batch.is_floating_point():  # 0-1 floats, as torchvision's to_tensor gives
                batch = (batch * 255).round().clamp(0, 255).to(torch.uint8)
            masks = self.predict_batch(batch.cpu())[0]
            return masks if image.dim() == 4 else masks[0]
        array = photo_array(image) if isinstance(image, Image.Image) else np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {array.shape} {array.dtype}")
        batch = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
        return self.predict_batch(batch)[0][0].numpy().astype(np.uint8 if self.num_classes <= 256 else np.int32)


# ----------------------------------------------------------------------------------------- hafis predict
def collect_inputs(inputs: Sequence[Union[str, Path]], exclude: Optional[Path] = None,
                   ) -> tuple[list[tuple[Path, PurePath]], list[dict]]:
    """``([(image path, output name), ...], [skipped {input, error}, ...])`` from files, folders (recursive; every
    file, so that one without an image extension is named; hidden ones and ``exclude``, the output folder, left
    out) and ``.txt`` lists of paths (one a line, relative to the list's folder; ``#`` comments). Output names keep
    a folder's sub-folders."""
    found: list[tuple[Path, PurePath]] = []
    skipped: list[dict] = []

    def add_file(path: Path, name: PurePath) -> None:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append((path, name))
        else:
            skipped.append({"input": str(path), "error": f"not an image file (extension {path.suffix or 'none'!r})"})

    for item in map(Path, inputs):
        if item.is_dir():
            skip = exclude.resolve() if exclude is not None else None
            for path in sorted(p for p in item.rglob("*") if p.is_file()):
                if skip is not None and skip in path.resolve().parents:
                    continue
                rel = path.relative_to(item)
                if not any(part.startswith(".") for part in rel.parts):  # hidden files and folders
                    add_file(path, rel)
        elif item.suffix.lower() == ".txt" and item.is_file():
            try:
                lines = item.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                skipped.append({"input": str(item), "error": f"cannot read the list: {exc}"})
                continue
            for line in (s.strip() for s in lines):
                if line and not line.startswith("#"):
                    path = Path(line) if Path(line).is_absolute() else item.parent / line
                    if path.is_file():
                        add_file(path, PurePath(path.name))
                    else:
                        skipped.append({"input": str(path), "error": f"listed in {item} but not a file"})
        elif item.is_file():
            add_file(item, PurePath(item.name))
        else:
            skipped.append({"input": str(item), "error": "no such file or folder"})
    return found, skipped


def _unique_stems(names: Iterable[PurePath]) -> list[PurePath]:
    """Output stems (``a/b`` for ``a/b.jpg``), made unique (case-insensitively) by ``-2``, ``-3``... in input
    order."""
    seen: set[str] = set()
    out = []
    for name in names:
        stem = base = name.with_suffix("")
        k = 1
        while str(stem).lower() in seen:
            k += 1
            stem = base.with_name(f"{base.name}-{k}")
        seen.add(str(stem).lower())
        out.append(stem)
    return out


def _png(array: np.ndarray, palette: Optional[list[int]] = None) -> bytes:
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    if palette is not None:
        image.putpalette(palette)  # an 8-bit grey image becomes a palette image of the same indices
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


#: the overlay picture is at least this wide, so that its legend stays readable beside a small image
MIN_PICTURE_WIDTH = 360


def _overlay(image: np.ndarray, mask: np.ndarray, flat_palette: list[int], class_names: Sequence[str],
             prob: Optional[np.ndarray] = None, alpha: float = 0.5) -> bytes:
    """The ``--overlay`` picture (JPEG): the mask blended over the image; with ``prob`` the top-class probability
    beside it (black 0 to white 1, with its colour bar); below, a legend of the classes in the mask (colour, id,
    name)."""
    from PIL import ImageDraw

    h, w = mask.shape
    colours = np.asarray(flat_palette, np.float32).reshape(-1, 3)
    blended = ((1 - alpha) * image.astype(np.float32) + alpha * colours[mask]).round().clip(0, 255).astype(np.uint8)
    panels = [blended] if prob is None else [blended, np.repeat(np.round(prob * 255).astype(np.uint8)[..., None], 3,
                                                                 axis=2)]
    gap = max(4, w // 50)
    font = _font(max(11, min(h, w) // 24))
    line = font.getbbox("Ag")[3] + 4
    caption = "top-class probability"
    bw = max(w, int(font.getlength(f"0  {caption}  1")) + 8)  # the colour bar's width
    width = max(MIN_PICTURE_WIDTH, len(panels) * w + (len(panels) - 1) * gap, w + gap + bw if prob is not None else 0)
    ids = [int(c) for c in np.unique(mask)]
    labels = [f"{c} {class_names[c] if c < len(class_names) else f'class {c}'}" for c in ids]
    # legend entries flow left to right, wrapping at the picture's width
    entries, x, y = [], gap, 0
    for c, text in zip(ids, labels, strict=True):
        size = line + 4 + int(font.getlength(text)) + 2 * gap
        if x + size > width and x > gap:
            x, y = gap, y + line + 2
        entries.append((x, y, c, text))
        x += size
    bar = (line * 2 + 2 * gap) if prob is not None else 0
    legend_h = y + line + 2 * gap
    canvas = Image.new("RGB", (width, h + bar + legend_h), "white")
    for i, panel in enumerate(panels):
        canvas.paste(Image.fromarray(panel), (i * (w + gap), 0))
    draw = ImageDraw.Draw(canvas)
    if prob is not None:  # the colour bar under the probability panel: a 0..1 ramp with its ends and its name
        x0, y0 = w + gap, h + gap
        ramp = np.repeat(np.linspace(0, 255, bw).round().astype(np.uint8)[None, :], line // 2, axis=0)
        canvas.paste(Image.fromarray(ramp).convert("RGB"), (x0, y0))
        draw.rectangle((x0, y0, x0 + bw - 1, y0 + line // 2 - 1), outline=(128, 128, 128))
        draw.text((x0, y0 + line // 2 + 1), "0", fill="black", font=font)
        draw.text((x0 + bw, y0 + line // 2 + 1), "1", fill="black", font=font, anchor="ra")
        draw.text((x0 + bw // 2, y0 + line // 2 + 1), caption, fill="black", font=font, anchor="ma")
    for x, y, c, text in entries:
        top = h + bar + gap + y
        draw.rectangle((x, top + 2, x + line - 2, top + line - 2), fill=tuple(int(v) for v in colours[c]),
                       outline=(128, 128, 128))
        draw.text((x + line + 2, top), text, fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def predict_files(predictor: Predictor, inputs: Sequence[Union[str, Path]], out_dir: Union[str, Path], *,
                  batch_size: int = 1, overlay: bool = False, scores: bool = False,
                  progress: Optional[bool] = None, log=None) -> dict:
    """Predict every image of ``inputs`` (see :func:`collect_inputs`) into ``out_dir``: ``<name>.png`` (class ids,
    palette PNG), with ``overlay`` ``<name>_overlay.jpg``, with ``scores`` ``<name>_scores.png`` (top-class
    probability x 255), and ``predictions.json`` (per image its size and class areas in pixels; the skipped files
    with the reason). Images of one size run in batches of ``batch_size``; a file that cannot be read is skipped
    with one line on ``log``. Returns the summary written to ``predictions.json``."""
    from tqdm import tqdm

    out_dir, log = Path(out_dir), sys.stderr if log is None else log
    found, skipped = collect_inputs(inputs, exclude=out_dir)
    for s in skipped:
        print(f"skipped {s['input']}: {s['error']}", file=log)
    stems = _unique_stems(name for _, name in found)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (path, _) in enumerate(found):
        try:
            by_size.setdefault(photo_size(path), []).append(i)
        except UNREADABLE as exc:
            skipped.append({"input": str(path), "error": _reason(exc)})
            print(f"skipped {path}: {_reason(exc)}", file=log)
    records: dict[int, dict] = {}
    flat_palette = predictor.palette or palette("")
    with tqdm(total=sum(map(len, by_size.values())), unit="image", disable=None if progress is None else not progress,
              file=log) as bar:
        for indices in by_size.values():
            for start in range(0, len(indices), max(1, batch_size)):
                images, kept = [], []
                for i in indices[start:start + max(1, batch_size)]:
                    try:
                        images.append(photo_array(found[i][0]))
                        kept.append(i)
                    except UNREADABLE as exc:
                        skipped.append({"input": str(found[i][0]), "error": _reason(exc)})
                        print(f"skipped {found[i][0]}: {_reason(exc)}", file=log)
                    bar.update(1)
                shapes = {image.shape for image in images}  # one, unless a header misstated the size
                for shape in shapes:
                    part = [(i, image) for i, image in zip(kept, images, strict=True) if image.shape == shape]
                    batch = torch.from_numpy(np.stack([image for _, image in part])).permute(0, 3, 1, 2)
                    masks, top = predictor.predict_batch(batch)
                    for (i, image), mask, prob in zip(part, masks.numpy(), top.numpy(), strict=True):
                        records[i] = _write_outputs(out_dir, stems[i], found[i][0], image, mask, prob, predictor,
                                                    flat_palette, overlay, scores)
    summary = {"classes": predictor.class_names, "images": [records[i] for i in sorted(records)],
               "skipped": skipped}
    if records:
        write_json(out_dir / "predictions.json", summary, indent=1)
    return summary


def _reason(exc: BaseException) -> str:
    return f"not a readable image ({' '.join(str(exc).split()) or type(exc).__name__})"


def _write_outputs(out_dir: Path, stem: PurePath, source: Path, image: np.ndarray, mask: np.ndarray,
                   prob: np.ndarray, predictor: Predictor, flat_palette: list[int], overlay: bool,
                   scores: bool) -> dict:
    mask = mask.astype(np.uint8)
    base = out_dir / stem
    atomic_write(base.with_name(base.name + ".png"), _png(mask, flat_palette))
    record = {"input": str(source), "mask": f"{stem.as_posix()}.png", "height": int(mask.shape[0]),
              "width": int(mask.shape[1])}
    if overlay:
        atomic_write(base.with_name(base.name + "_overlay.jpg"),
                     _overlay(image, mask, flat_palette, predictor.class_names, prob if scores else None))
    if scores:
        atomic_write(base.with_name(base.name + "_scores.png"), _png(np.round(prob * 255)))
    areas = np.bincount(mask.ravel(), minlength=predictor.num_classes)
    record["areas"] = {predictor.class_names[c]: int(areas[c]) for c in np.flatnonzero(areas)}
    return record
