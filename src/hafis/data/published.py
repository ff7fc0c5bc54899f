"""The published semi-supervised splits, shipped with hafis: what ``hafis prepare DATASET ROOT --published PROTOCOL``
writes.

``published_splits/<protocol>_<dataset>.tar.xz`` holds the releases' list files unchanged, under their paths in the
release (``pascal/92/labeled.txt``); ``published_splits/README.md`` names each file's repository and commit. Two
protocols:

- ``unimatch``: LiheYoung/UniMatch-V2 ``splits/`` (UniMatch V1's VOC and Cityscapes lists are the same; its
  Cityscapes ``1_30``, 100 labels, is line for line the list the seed paper's authors ship). VOC classic 92 … 1464,
  Cityscapes 1/16 … 1/2 and 1/30, COCO 1/512 … 1/32, ADE20K 1/64 … 1/2.
- ``u2pl``: Haochen-Wang409/U2PL ``data/splits/`` (AugSeg uses them; AEL, which ships none, is reported beside U2PL).
  VOC classic 92 … 1464 (the same lists as UniMatch's) and blended 662 … 5291, Cityscapes 186 … 1488 (other images
  than UniMatch's lists of the same sizes).

Every unlabelled list of both releases is exactly the rest of the training set (compared, as sets, with the
release's list of the whole training set: VOC's 10,582, Cityscapes' 2,975, ADE20K's 20,210; UniMatch's COCO
unlabelled lists, not copied, are the rest of ``train2017``), so only the labelled lists are shipped, with one list
of the whole training set per protocol and dataset (UniMatch's ``all`` lists; U2PL's ``92/labeled.txt`` +
``92/unlabeled.txt`` and ``186/...``); COCO's training set is the tree's ``train2017``. The releases' validation
lists are the datasets' whole official val sets, which every reader lists itself.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import PurePosixPath
from typing import Optional, Sequence

#: ``--published``: the protocols shipped
PROTOCOLS = ("unimatch", "u2pl")


@dataclass(frozen=True)
class PublishedSplit:
    """One labelled list of a release and where hafis puts it: ``ROOT/splits/<protocol>/[<setting>/]<folder>/``."""

    folder: str  # hafis's name: 92, 1_16
    member: str  # the release's labelled list in the archive: pascal/662/labeled.txt
    setting: Optional[str] = None  # Pascal VOC: classic / blended

    @property
    def release_name(self) -> str:
        """The release's folder name of the split (U2PL's blended 1/16: ``662``)."""
        return PurePosixPath(self.member).parent.name


@dataclass(frozen=True)
class Release:
    """The lists one protocol publishes for one dataset."""

    protocol: str
    dataset: str
    title: str  # who publishes them, for messages: "UniMatch V2"
    repo: str
    commit: str
    path: str  # the release's folder the archive's members are relative to
    splits: tuple[PublishedSplit, ...]
    #: members whose lines, in order, list the whole training set; empty: the tree's own training images (COCO)
    train: tuple[str, ...] = ()

    @property
    def archive(self) -> str:
        return f"{self.protocol}_{self.dataset}.tar.xz"

    def source(self, member: str) -> str:
        return f"{self.repo}@{self.commit} {self.path}/{member}"


def _splits(root: str, names: Sequence[str], setting: Optional[str] = None,
            folders: Optional[Sequence[str]] = None) -> tuple[PublishedSplit, ...]:
    folders = folders or names
    return tuple(PublishedSplit(f, f"{root}/{n}/labeled.txt", setting) for n, f in zip(names, folders, strict=True))


_UNIMATCH = dict(protocol="unimatch", title="UniMatch V2", repo="LiheYoung/UniMatch-V2", commit="f6afb4d",
                 path="splits")
_U2PL = dict(protocol="u2pl", title="U2PL", repo="Haochen-Wang409/U2PL", commit="ab3d2be", path="data/splits")
_CLASSIC = ("92", "183", "366", "732", "1464")

#: (protocol, dataset) -> what the release publishes
RELEASES: dict[tuple[str, str], Release] = {(r.protocol, r.dataset): r for r in (
    Release(dataset="voc", splits=_splits("pascal", _CLASSIC, "classic"), train=("pascal/all/labeled.txt",),
            **_UNIMATCH),
    Release(dataset="cityscapes", splits=_splits("cityscapes", ("1_16", "1_8", "1_4", "1_2", "1_30")),
            train=("cityscapes/all/train.txt",), **_UNIMATCH),
    Release(dataset="coco", splits=_splits("coco", ("1_512", "1_256", "1_128", "1_64", "1_32")), **_UNIMATCH),
    Release(dataset="ade20k", splits=_splits("ade20k", ("1_64", "1_32", "1_16", "1_8", "1_4", "1_2")),
            train=("ade20k/all/labeled.txt",), **_UNIMATCH),
    Release(dataset="voc", splits=_splits("pascal", _CLASSIC, "classic") + _splits(
        "pascal", ("662", "1323", "2646", "5291"), "blended", ("1_16", "1_8", "1_4", "1_2")),
        train=("pascal/92/labeled.txt", "pascal/92/unlabeled.txt"), **_U2PL),
    Release(dataset="cityscapes", splits=_splits("cityscapes", ("186", "372", "744", "1488"),
                                                 folders=("1_16", "1_8", "1_4", "1_2")),
            train=("cityscapes/186/labeled.txt", "cityscapes/186/unlabeled.txt"), **_U2PL),
)}


def release(protocol: str, dataset: str) -> Release:
    """The lists ``protocol`` publishes for ``dataset``; a ``ValueError`` names the protocols that have some."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--published {protocol!r}: the shipped protocols are {', '.join(PROTOCOLS)}")
    if (protocol, dataset) not in RELEASES:
        others = [p for p, d in RELEASES if d == dataset]
        raise ValueError(f"--published {protocol}: no published {dataset} lists from that release"
                         + (f"; {dataset} has: {', '.join(others)}" if others else
                            f"; published lists exist for {', '.join(sorted({d for _, d in RELEASES}))}"))
    return RELEASES[(protocol, dataset)]


def select(rel: Release, setting: Optional[str] = None, name: Optional[str] = None) -> list[PublishedSplit]:
    """The splits of ``rel`` in ``setting`` (VOC; ignored elsewhere), or the one named ``name`` (hafis's folder name
    or the release's: ``1_16`` or ``662``)."""
    pool = [s for s in rel.splits if s.setting is None or s.setting == setting]
    if not pool:
        settings = sorted({s.setting for s in rel.splits})
        raise ValueError(f"--published {rel.protocol}: {rel.title} publishes no {setting} {rel.dataset} lists; "
                         f"its settings: {', '.join(settings)} (--setting)")
    if name is None:
        return pool
    chosen = [s for s in pool if name in (s.folder, s.release_name)]
    if not chosen:
        names = ", ".join(s.folder if s.folder == s.release_name else f"{s.folder} ({s.release_name})" for s in pool)
        where = f"{setting} {rel.dataset}" if pool[0].setting else rel.dataset
        raise ValueError(f"--split {name!r}: {rel.title}'s {where} splits are {names}")
    return chosen


def read_lists(rel: Release) -> dict[str, list[str]]:
    """Every list file of ``rel``'s archive: member name -> its non-blank lines, stripped, in file order."""
    data = resources.files(__package__).joinpath("published_splits", rel.archive).read_bytes()
    lists = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        for member in tar.getmembers():
            if member.isfile():
                text = tar.extractfile(member).read().decode("utf-8")
                lists[member.name] = [line.strip() for line in text.splitlines() if line.strip()]
    return lists


__all__ = ["PROTOCOLS", "PublishedSplit", "RELEASES", "Release", "read_lists", "release", "select"]
