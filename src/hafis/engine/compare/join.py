"""Several comparisons reported as one (a benchmark whose splits or schedules are comparisons of their own): their
result rows together, grouped tables over them, and each comparison's ``report.md`` as a section."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

from .tables import arm_table, contrast_table, end_tables

__all__ = ["Call", "Part", "Joined", "figure", "group_tables", "join", "merged", "notes", "run_compare", "split_names",
           "split_tables", "write"]


class Call(NamedTuple):
    """One ``hafis compare`` call of the whole: its folder (under the whole's output folder), arms, common overrides
    and seeds (comma-separated)."""

    folder: str
    arms: list[str]
    common: str
    seeds: str


def merged(calls: Sequence[Call]) -> list[Call]:
    """One call per folder with the arms and seeds of all the calls into it, in order: what the folder's report
    covers. Two calls into one folder with different overrides are a ``ValueError``."""
    by: dict[str, Call] = {}
    for c in calls:
        if c.folder in by and by[c.folder].common != c.common:
            raise ValueError(f"folder {c.folder}: calls with different overrides")
        prev = by.get(c.folder, c._replace(arms=[], seeds=""))
        by[c.folder] = prev._replace(arms=list(dict.fromkeys(prev.arms + c.arms)), seeds=",".join(
            dict.fromkeys(filter(None, prev.seeds.split(",") + c.seeds.split(",")))))
    return list(by.values())


def split_names(text: str) -> list[str]:
    """Arm names separated by commas outside parentheses (``unimatch+W(authors,shuffled)`` is one name)."""
    return [name.strip() for name in re.split(r",(?![^()]*\))", text) if name.strip()]


def run_compare(root: Path, config: Path, arms: Mapping[str, str], seeds: str, common: Sequence[str], out: Path,
                jobs: int = 1, threads: Optional[int] = None, records: Optional[Path] = None,
                report_only: bool = False) -> int:
    """One ``hafis compare`` process run in ``root`` with the paths inside it relative to it, so that its records
    and reports name no machine's folders; ``arms``: name -> overrides."""
    def rel(path: Path) -> str:
        path = Path(path).resolve()
        return str(path.relative_to(root) if path.is_relative_to(root) else path)

    command = [sys.executable, "-m", "hafis", "compare", rel(config), "--seeds", seeds, "--jobs", str(jobs), "--out",
               rel(out), *(["--threads", str(threads)] if threads else []),
               *(["--records", rel(records)] if records else []), *(["--report-only"] if report_only else []),
               "--set", *common, *(a for name, o in arms.items() for a in ("--arm", f"{name}: {o}"))]
    print("$", shlex.join(command), flush=True)
    return subprocess.Popen(command, cwd=root).wait()


@dataclass(frozen=True)
class Part:
    """One comparison of the whole: its ``--out`` folder, the name its copied files carry, its section's title, and
    optionally a markdown file whose body follows the section under ``appendix[1]`` (a heading)."""

    folder: Path
    name: str
    title: str
    appendix: Optional[tuple[Path, str]] = None


@dataclass
class Joined:
    """A part that has results: its rows (``results.json``'s, with the caller's fields) and its report section."""

    part: Part
    rows: list[dict]
    section: str
    machine: str


def join(parts: Sequence[Part], dest: Path, stem: str,
         fields: Optional[Callable[[Part, dict], dict]] = None) -> list[Joined]:
    """The parts with a ``results.json``, in order: each row updated with ``fields(part, row)``, and the report as a
    section (``## The runs of TITLE``) whose plots are copied into ``dest`` as ``STEM_NAME_PLOT`` and linked so."""
    joined = []
    dest.mkdir(parents=True, exist_ok=True)
    for part in parts:
        path = part.folder / "results.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        rows = [{**row, **(fields(part, row) if fields else {})} for row in data["runs"]]
        report = (part.folder / "report.md").read_text()
        for plot in ("miou.png", "diagnostics.png"):
            if (part.folder / plot).is_file():
                shutil.copyfile(part.folder / plot, dest / f"{stem}_{part.name}_{plot}")
            report = report.replace(f"({plot})", f"({stem}_{part.name}_{plot})")
        section = f"## The runs of {part.title} (`hafis compare` report)\n\n" + report.split("\n", 1)[1]
        if part.appendix and part.appendix[0].is_file():
            section += f"\n### {part.appendix[1]}\n\n" + part.appendix[0].read_text().split("\n", 1)[1]
        joined.append(Joined(part, rows, section, data.get("machine", "")))
    return joined


def group_tables(groups: Sequence[tuple[str, list[dict], list[str]]], arms: Sequence[str],
                 contrasts: Sequence[tuple[str, str]], fractions: Sequence[float] = (0.25, 0.5)) -> list[str]:
    """Per group (a sentence saying what it is; its rows, runs of one setting with an ``(arm, seed)`` once; lines to
    follow its tables, such as a figure): the arm table, the contrasts' paired differences and the per-arm tables at
    the end of the schedule."""
    lines = []
    for intro, rows, after in groups:
        lines += [intro, "", *arm_table(rows, arms), "", *contrast_table(rows, contrasts, fractions), "",
                  *end_tables(rows, arms), *after]
    return lines


def split_tables(runs: Sequence[dict], arms: Sequence[str], contrasts: Sequence[tuple[str, str]], images: int,
                 figures: Optional[Mapping[tuple, list[str]]] = None, full: str = "fully-supervised",
                 fractions: Sequence[float] = (0.25, 0.5)) -> list[str]:
    """:func:`group_tables` per split (``labelled`` images of ``images``) and precision (``train.amp``): the runs of
    arm ``full`` (every image labelled) join each split's runs of their precision; two precisions never pair.
    ``figures``: ``(labelled, precision)`` -> lines after that group's tables."""
    groups = []
    for n, precision in sorted({(r["labelled"], r.get("precision")) for r in runs if r["arm"] != full},
                               key=lambda g: (g[0], g[1] == "off", str(g[1]))):
        group = {(r["arm"], r["seed"]): r for r in runs
                 if r.get("precision") == precision and (r["labelled"] == n) != (r["arm"] == full)}
        steps = " (float32 steps)" if precision == "off" else f" ({precision} steps)" if precision else ""
        groups.append((f"**{n} labelled images** of {images}{steps} (final / best mIoU %, mean ± std over seeds, n; "
                       "last quarter = final mIoU minus the mIoU at 3/4 of the schedule, near 0 when converged):",
                       [group[a, s] for a in arms for s in sorted({s for _, s in group}) if (a, s) in group],
                       (figures or {}).get((n, precision), [])))
    return group_tables(groups, arms, contrasts, fractions)


def write(dest: Path, stem: str, runs: Sequence[dict], command: str, machine: str, heading: str, lines: Sequence[str],
          about: str = "") -> None:
    """``dest/STEM.json`` (the command, the machine, every run) and ``dest/STEM.md``: ``# heading``, the command and
    machine (then ``about``), and ``lines``."""
    (dest / f"{stem}.json").write_text(json.dumps({"command": command, "machine": machine, "runs": list(runs)},
                                                   indent=1) + "\n")
    (dest / f"{stem}.md").write_text(f"# {heading}\n\n`{command}` on {machine}{about}\n\n" + "\n".join(lines))


def figure(name: str, alt: str, caption: str) -> list[str]:
    """A figure's lines in a joined report: the picture and a caption naming its file."""
    return [f"![{alt}]({name})", "", f"`{name}`: {caption}", ""]


def notes(path: Path, heading: str, placeholder: str) -> list[str]:
    """A hand-written section (``path``, kept when the report is rebuilt), or ``placeholder`` until it exists."""
    return [f"## {heading}", "", path.read_text().strip() if path.is_file() else placeholder, ""]
