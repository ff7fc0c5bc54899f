"""Split lists, tree validation and ``hafis prepare``.

Split files are plain text, one image id a line, as the published lists are (UniMatch, U2PL, AugSeg). Lines may
hold paths and a second column (``JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png``): the first token
is read and the dataset turns it into its id (VOC / COCO: the file stem; Cityscapes: ``city/city_seq_frame``).
Blank lines and lines starting with ``#`` are skipped.

``hafis prepare DATASET ROOT --labelled N|FRACTION --seed S`` writes ``labelled.txt``, ``unlabelled.txt`` and
``val.txt`` in that format (default folder ``ROOT/splits/[SETTING/]LABEL`` with LABEL ``92`` or ``1_16``), plus
``prepare.json`` with the command's arguments. The labelled subset is the first N of a seeded permutation of the
sorted labelled pool, so it depends on the seed and the pool only, and with one seed the smaller splits are
subsets of the larger ones. A fraction gives ``ceil(fraction * pool)`` images: 1/16 of VOC's 10,582 is 662, of
Cityscapes' 2,975 is 186, 1/512 of COCO's 118,287 is 232 (the published counts).

``hafis prepare DATASET ROOT --published unimatch|u2pl [--split NAME]`` writes the releases' own splits instead
(:mod:`hafis.data.published`, shipped with hafis) into ``ROOT/splits/PROTOCOL/[SETTING/]SPLIT``, where the paper
configs read them: ``labelled.txt`` holds the release's lines, ``unlabelled.txt`` the rest of the training set (as
every release's unlabelled list is). It first checks that every image the lists name exists (one line naming the
first missing one and the count, exit 2), and refuses to replace a split file that differs from what it would write.

Before writing anything it checks the tree: every missing or unreadable image or mask, mask of the wrong size, and
label value outside the class range is reported, all at once, with its path.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Optional, Sequence, TextIO

import numpy as np

from hafis.errors import short
from hafis.files import atomic_write, write_json

from . import published
from .base import DataError
from .io import Problem
from .layout import DatasetLayout


def _voc(root, voc_setting, classes, cache_dir) -> DatasetLayout:
    from .voc import PascalVOC

    return PascalVOC(root, voc_setting)


def _cityscapes(root, voc_setting, classes, cache_dir) -> DatasetLayout:
    from .cityscapes import Cityscapes

    return Cityscapes(root)


def _coco(root, voc_setting, classes, cache_dir) -> DatasetLayout:
    from .coco import COCO

    return COCO(root, cache_dir=cache_dir)


def _ade20k(root, voc_setting, classes, cache_dir) -> DatasetLayout:
    from .ade20k import ADE20K

    return ADE20K(root)


def _folder(root, voc_setting, classes, cache_dir) -> DatasetLayout:
    from .folder import ImageFolder

    return ImageFolder(root, classes)


#: the datasets stored as trees on disk: name -> ``(root, voc_setting, classes, cache_dir) -> DatasetLayout``
#: (each reader imported only when used)
DATASETS: dict[str, Callable[..., DatasetLayout]] = {"voc": _voc, "cityscapes": _cityscapes, "coco": _coco,
                                                     "ade20k": _ade20k, "folder": _folder}


def make_layout(name: str, root, voc_setting: str = "classic", classes: Optional[str] = None,
                cache_dir=None) -> DatasetLayout:
    """The :class:`DatasetLayout` of dataset ``name`` stored at ``root``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name](root, voc_setting, classes, cache_dir)


# ------------------------------------------------------------------------------------------------ split files
def read_split(path, normalize: Callable[[str], str] = lambda t: t) -> list[str]:
    """Ids of a split file (first token of each non-blank, non-``#`` line, through ``normalize``), in file order,
    duplicates dropped. An id must stay inside the dataset root (no absolute path, no ``..``); a line the dataset
    cannot read as an id is a :class:`DataError` naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"split file {path} is not UTF-8 text (byte offset {exc.start})") from None
    except OSError as exc:
        raise DataError(f"split file {path} cannot be read: {exc.strerror or exc}") from None
    ids, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            id = normalize(line.split()[0])
        except ValueError as exc:
            raise DataError(f"split file {path} line {number}: {exc}") from None
        if PurePosixPath(id).is_absolute() or PureWindowsPath(id).is_absolute() or ".." in PurePosixPath(
                id.replace("\\", "/")).parts:
            raise DataError(f"split file {path} line {number}: id {short(id)} leaves the dataset root")
        if id not in seen:
            seen.add(id)
            ids.append(id)
    return ids


def write_split(path, ids: Sequence[str]) -> None:
    atomic_write(path, "".join(f"{i}\n" for i in ids))


@dataclass(frozen=True)
class LabelledCount:
    """``--labelled``: an absolute count (``92``) or a fraction of the pool (``1/16``, ``0.0625``)."""

    count: Optional[int] = None
    fraction: Optional[Fraction] = None

    @classmethod
    def parse(cls, text: str) -> "LabelledCount":
        text = str(text).strip()
        if re.fullmatch(r"\d+", text):
            n = int(text)
            if n < 1:
                raise ValueError("--labelled must be at least 1")
            return cls(count=n)
        try:
            frac = Fraction(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"--labelled {text!r} is neither a count (92) nor a fraction (1/16, 0.0625)") from None
        if not 0 < frac <= 1:
            raise ValueError(f"--labelled fraction {text} must be in (0, 1]")
        return cls(fraction=frac)

    def resolve(self, pool_size: int) -> int:
        if self.count is not None:
            if self.count > pool_size:
                raise ValueError(f"--labelled {self.count} exceeds the {pool_size} images of the labelled pool")
            return self.count
        return max(1, math.ceil(self.fraction * pool_size))

    @property
    def label(self) -> str:
        """Folder name: ``92`` or ``1_16`` (``0.1`` -> ``1_10``)."""
        if self.count is not None:
            return str(self.count)
        return f"{self.fraction.numerator}_{self.fraction.denominator}"


def choose_labelled(pool: Sequence[str], n: int, seed: int) -> list[str]:
    """The first ``n`` of a seeded permutation of the sorted pool, returned sorted (nested across ``n``)."""
    ordered = sorted(set(pool))
    if n > len(ordered):
        raise ValueError(f"cannot choose {n} labelled images from a pool of {len(ordered)}")
    perm = np.random.default_rng(seed).permutation(len(ordered))
    return sorted(ordered[i] for i in perm[:n])


# ------------------------------------------------------------------------------------------------- ids of a run
def resolve_split_path(path, root) -> Path:
    """A split path from the config: absolute, or relative to ``data.root``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root).expanduser() / p


#: the config keys of a run's split files (in ``data``)
SPLIT_KEYS = ("labelled_split", "unlabelled_split", "val_split")


def split_digests(data_config) -> dict[str, str]:
    """SHA-256 of each split file a real-dataset config names, as ``{'data.labelled_split': hex, ...}``: the images a
    run trains on are part of its experiment, so a resumed run compares them like the config."""
    if data_config.dataset not in DATASETS or data_config.root is None:
        return {}
    digests = {}
    for key in SPLIT_KEYS:
        name = getattr(data_config, key)
        path = resolve_split_path(name, data_config.root) if name else None
        if path is not None and path.is_file():
            digests[f"data.{key}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def split_ids(layout: DatasetLayout, labelled_split=None, unlabelled_split=None,
              val_split=None) -> tuple[list[str], list[str], list[str]]:
    """``(labelled, unlabelled, val)`` ids: the split files where given, else the layout's pools
    (labelled = the whole labelled pool, unlabelled = the rest of the training pool, val = the val set)."""
    def read(path):
        return read_split(resolve_split_path(path, layout.root), layout.normalize_id)

    labelled = read(labelled_split) if labelled_split else layout.labelled_pool()
    if unlabelled_split:
        unlabelled = read(unlabelled_split)
    else:
        chosen = set(labelled)
        unlabelled = [i for i in layout.train_pool() if i not in chosen]
    val = read(val_split) if val_split else layout.val_ids()
    return labelled, unlabelled, val


# ---------------------------------------------------------------------------------------------------- prepare
#: images checked between two progress lines
CHECK_CHUNK = 2000


def missing_images(layout: DatasetLayout, ids: Sequence[str], part: str) -> list[str]:
    """Paths of the images of ``ids`` that do not exist (one ``stat`` each: cheap enough before every run)."""
    return [str(p) for p in (layout.image_path(i, part) for i in ids) if not p.is_file()]


def validate(layout: DatasetLayout, log: Optional[TextIO] = None) -> list[Problem]:
    """Every problem of the tree: the labelled pool and val need masks; other training images need none (a mask
    that is there is still checked)."""
    problems: list[Problem] = []

    failed = []

    def pool(get) -> list[str]:  # a missing list or folder is one more problem, and the other pools still run
        try:
            return get()
        except (FileNotFoundError, ValueError) as exc:
            problems.append(Problem(str(layout.root), str(exc)))
            failed.append(get)
            return []

    labelled = pool(layout.labelled_pool)
    lab = set(labelled)
    others = [i for i in pool(layout.train_pool) if i not in lab]
    val = pool(layout.val_ids)
    for ids, part in ((labelled, "labelled"), (others, "unlabelled"), (val, "val")):
        if log is not None:
            print(f"checking {len(ids)} {part} image(s) ...", file=log)
        for start in range(0, len(ids), CHECK_CHUNK):
            problems += layout.check(ids[start:start + CHECK_CHUNK], part)
            if log is not None and len(ids) > CHECK_CHUNK:
                print(f"  {min(start + CHECK_CHUNK, len(ids))}/{len(ids)} {part} checked, "
                      f"{len(problems)} problem(s) so far", file=log)
    if not labelled and layout.labelled_pool not in failed:
        problems.append(Problem(str(layout.root), "no training image with a mask: the labelled pool is empty"))
    if not val and layout.val_ids not in failed:
        problems.append(Problem(str(layout.root), "no validation image"))
    return problems


def default_out(layout: DatasetLayout, count: LabelledCount) -> Path:
    sub = layout.split_subdir()
    return layout.root / "splits" / sub / count.label if sub else layout.root / "splits" / count.label


def prepare(layout: DatasetLayout, labelled: Optional[str] = None, seed: int = 0, out=None, check: bool = True,
            log: Optional[TextIO] = None) -> tuple[list[Problem], Optional[Path]]:
    """Validate the tree (unless ``check`` is False) and, when ``labelled`` is given and nothing is wrong, write
    the split files. Returns ``(problems, folder written or None)``."""
    problems = validate(layout, log) if check else []
    if problems or labelled is None:
        return problems, None
    count = LabelledCount.parse(labelled)
    pool = layout.labelled_pool()
    n = count.resolve(len(pool))
    chosen = choose_labelled(pool, n, seed)
    taken = set(chosen)
    unlabelled = sorted(i for i in set(layout.train_pool()) if i not in taken)
    val = layout.val_ids()
    folder = Path(out) if out is not None else default_out(layout, count)
    write_split(folder / "labelled.txt", chosen)
    write_split(folder / "unlabelled.txt", unlabelled)
    write_split(folder / "val.txt", val)
    info = {"dataset": layout.name, "root": str(layout.root), "labelled": labelled, "seed": seed,
            "setting": layout.split_subdir() or None, "counts": {"labelled": len(chosen),
                                                                 "unlabelled": len(unlabelled), "val": len(val)},
            "labelled_pool": len(pool)}
    write_json(folder / "prepare.json", info, indent=2)
    return [], folder


# ------------------------------------------------------------------------------------------- published splits
def published_folder(layout: DatasetLayout, protocol: str, split) -> Path:
    """``ROOT/splits/<protocol>/[<setting>/]<split>``: where ``--published`` writes a split, and the paper configs
    read it (``splits/unimatch/classic/92``, ``splits/u2pl/1_16``)."""
    return layout.root.joinpath("splits", *[p for p in (protocol, split.setting, split.folder) if p])


def published_lists(layout: DatasetLayout, protocol: str, name: Optional[str] = None):
    """``(release, [(split, labelled, unlabelled)])``: each chosen split's labelled lines as released and its
    unlabelled lines (the rest of the release's training list, or of the tree's training images where the release
    has none), both as ``{id: line}`` in list order."""
    release = published.release(protocol, layout.name)
    chosen = published.select(release, layout.split_subdir() or None, name)
    lists = published.read_lists(release)

    def keyed(lines) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in lines:
            out.setdefault(layout.normalize_id(line.split()[0]), line)
        return out

    train = keyed(line for member in release.train for line in lists[member]) if release.train else \
        {i: i for i in layout.train_pool()}
    result = []
    for split in chosen:
        labelled = keyed(lists[split.member])
        result.append((split, labelled, {i: line for i, line in train.items() if i not in labelled}))
    return release, result


def prepare_published(layout: DatasetLayout, protocol: str, name: Optional[str] = None, out=None, check: bool = True,
                      log: Optional[TextIO] = None) -> tuple[list[Problem], list[tuple[Path, str, dict]]]:
    """Write ``protocol``'s published splits of the layout's dataset (one, with ``name``): ``labelled.txt`` (the
    release's lines), ``unlabelled.txt`` (the rest of the training set), ``val.txt`` (the tree's val set) and
    ``prepare.json``. First every image the lists name must exist (else a ``FileNotFoundError`` naming the first
    missing one and the count), then the tree passes :func:`validate` (unless ``check`` is False), and no split file
    already there may differ from what would be written (a ``ValueError``: nothing is overwritten). Returns
    ``(problems, [(folder, source of its labelled list, counts)])``."""
    release, splits = published_lists(layout, protocol, name)
    if out is not None and len(splits) > 1:
        raise ValueError("--out names the folder of one split: give --split too")
    listed: dict[tuple[str, str], None] = {}  # every listed image once, in list order
    for _, labelled, unlabelled in splits:
        listed.update(dict.fromkeys((i, "labelled") for i in labelled))
        listed.update(dict.fromkeys((i, "unlabelled") for i in unlabelled))
    images = dict.fromkeys(layout.image_path(i, part) for i, part in listed)
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(images)} images of {release.title}'s {layout.name} lists "
                                f"are missing, the first: {missing[0]}; nothing written")
    problems = validate(layout, log) if check else []
    if problems:
        return problems, []
    val = layout.val_ids()
    plans = []
    for split, labelled, unlabelled in splits:
        folder = Path(out) if out is not None else published_folder(layout, protocol, split)
        texts = {f"{part}.txt": "".join(f"{line}\n" for line in lines) for part, lines in
                 (("labelled", labelled.values()), ("unlabelled", unlabelled.values()), ("val", val))}
        counts = {"labelled": len(labelled), "unlabelled": len(unlabelled), "val": len(val)}
        plans.append((split, folder, texts, counts))
    differ = [folder / n for _, folder, texts, _ in plans for n, text in texts.items()
              if (folder / n).is_file() and (folder / n).read_bytes() != text.encode()]
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise ValueError(f"{differ[0]}{more} exists and differs from the published list; nothing written (remove it, "
                         f"or write elsewhere with --split and --out)")
    written = []
    for split, folder, texts, counts in plans:
        for n, text in texts.items():
            atomic_write(folder / n, text)
        source = release.source(split.member)
        write_json(folder / "prepare.json", {"dataset": layout.name, "root": str(layout.root), "published": protocol,
                                             "split": split.folder, "setting": split.setting, "source": source,
                                             "counts": counts}, indent=2)
        written.append((folder, source, counts))
    return [], written


# -------------------------------------------------------------------------------------------------- the command
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def add_prepare_arguments(parser) -> None:
    parser.add_argument("dataset", choices=DATASETS, help="the tree's format")
    parser.add_argument("root", help="the dataset folder (VOC: VOC2012; Cityscapes: holds leftImg8bit and gtFine; "
                                     "COCO: holds train2017, val2017, annotations; ADE20K: ADEChallengeData2016; "
                                     "folder: holds classes.txt)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--labelled", help="labelled images to draw: a count (92) or a fraction of the labelled "
                                          "pool (1/16 or 0.0625); omit to only check the tree")
    which.add_argument("--published", choices=published.PROTOCOLS,
                       help="write a release's published splits instead (unimatch: UniMatch V2's lists, u2pl: U2PL's) "
                            "into ROOT/splits/PROTOCOL/[SETTING/]SPLIT, where the paper configs read them")
    parser.add_argument("--split", help="with --published: only this split (1_16, 92; U2PL's names work too: 662)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the labelled draw (default 0)")
    parser.add_argument("--out", help="folder for labelled.txt / unlabelled.txt / val.txt "
                                      "(default ROOT/splits/[SETTING/]LABEL, e.g. ROOT/splits/classic/92; "
                                      "--published: ROOT/splits/PROTOCOL/[SETTING/]SPLIT)")
    parser.add_argument("--setting", choices=("classic", "blended"), default="classic",
                        help="Pascal VOC: draw labelled images from the 1,464 fine (classic) or 10,582 (blended)")
    parser.add_argument("--classes", help="folder format: the class list (default ROOT/classes.txt)")
    parser.add_argument("--cache-dir", help="COCO: where rasterised masks are cached (default $HAFIS_CACHE or "
                                            "~/.cache/hafis)")
    parser.add_argument("--no-check", action="store_true", help="write the splits without checking the files")


def prepare_command(args, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """``hafis prepare``: 0 = fine (splits written if asked), 1 = problems found (all listed), 2 = usage error."""
    out, err = out or sys.stdout, err or sys.stderr
    written, folder = [], None
    try:
        if args.split is not None and args.published is None:
            raise ValueError("--split chooses one of the published splits: give --published too")
        if args.labelled is not None:
            LabelledCount.parse(args.labelled)
        layout = make_layout(args.dataset, args.root, voc_setting=args.setting, classes=args.classes,
                             cache_dir=args.cache_dir)
        if args.published is not None:
            problems, written = prepare_published(layout, args.published, args.split, args.out,
                                                  check=not args.no_check, log=err)
        else:
            problems, folder = prepare(layout, args.labelled, args.seed, args.out, check=not args.no_check, log=err)
    except (ValueError, FileNotFoundError) as exc:
        print(f"hafis prepare: error: {exc}", file=err)
        return EXIT_USAGE
    if problems:
        print(f"{len(problems)} problem(s) in {layout.root}:", file=out)
        for problem in problems:
            print(f"  {problem}", file=out)
        print(f"hafis prepare: error: {len(problems)} problem(s) found; nothing written", file=err)
        return EXIT_PROBLEMS
    if not args.no_check:
        print(f"{layout.root}: {layout.name} tree checked, no problem found", file=out)
    if folder is not None:
        counts = {name: len(read_split(folder / f"{name}.txt")) for name in ("labelled", "unlabelled", "val")}
        print(f"wrote {folder}/{{labelled,unlabelled,val}}.txt: {counts['labelled']} labelled, "
              f"{counts['unlabelled']} unlabelled, {counts['val']} val (seed {args.seed})", file=out)
        print(f"use them with: data.labelled_split={folder / 'labelled.txt'} "
              f"data.unlabelled_split={folder / 'unlabelled.txt'} data.val_split={folder / 'val.txt'}", file=out)
    for folder, source, counts in written:
        print(f"wrote {folder}/{{labelled,unlabelled,val}}.txt: {counts['labelled']} labelled, "
              f"{counts['unlabelled']} unlabelled, {counts['val']} val ({source})", file=out)
    if written:
        print("the paper configs read them from there (configs/README.md); any other config: "
              "data.labelled_split=FOLDER/labelled.txt data.unlabelled_split=FOLDER/unlabelled.txt", file=out)
    return 0


__all__ = ["DATASETS", "SPLIT_KEYS", "LabelledCount", "choose_labelled", "default_out", "make_layout", "prepare",
           "prepare_published", "published_folder", "published_lists", "read_split", "resolve_split_path",
           "split_digests", "split_ids", "validate", "write_split", "add_prepare_arguments", "prepare_command"]
