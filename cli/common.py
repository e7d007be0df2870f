"""What both console scripts share: one context manager for errors, notes and Ctrl-C, and the
summary printed after a merge."""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator

import click

from cabs_stream.errors import CabsError, cli_words

RESUME_HINT = "nothing was written under the output name; rerun the same command to resume from the completed chunks"


@contextlib.contextmanager
def cli_errors(interrupted: str = RESUME_HINT) -> Iterator[None]:
    """Run a command's work: its warnings become one ``note:`` line each when the block ends
    (on success or error); a CabsError or an OSError becomes one ``error:`` line and exit code
    2; Ctrl-C says what was kept and exits with 130."""
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        try:
            yield
        except (CabsError, OSError) as e:
            _print_notes(notes)
            fail(e)
        except KeyboardInterrupt:
            _print_notes(notes)
            click.echo(f"interrupted: {interrupted}", err=True)
            sys.exit(130)
        _print_notes(notes)


def _print_notes(notes: list[warnings.WarningMessage] | None) -> None:
    for text in dict.fromkeys(str(w.message) for w in notes or ()):
        click.echo(f"note: {cli_words(text)}", err=True)


def fail(e: Exception | str) -> None:
    """One line on stderr, exit code 2."""
    if isinstance(e, OSError):
        e = f"I/O error{' ' + str(e.filename) if e.filename else ''}: {e.strerror or e}"
    click.echo("error: " + " ".join(cli_words(str(e)).split()), err=True)
    sys.exit(2)


def print_summary(report: dict, out_dir: str) -> None:
    """A few lines a person can read: where, how dense, every overlap pair, balance by tensor class."""
    k = len(report["models"])
    cfg = report["config"]
    n = ",".join(map(str, cfg["n"])) if isinstance(cfg.get("n"), list) else cfg.get("n")
    what = cfg["merge_method"] + (f" {n}:{cfg['m']} ({cfg['overlap']})" if "overlap" in cfg else "")
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    click.echo(f"merged {k} models into {out_dir} with {what}")
    for i, name in enumerate(report["models"]):
        click.echo(f"  {name}: weight {cfg['models'][i].get('weight', '-')}, density {report['density'][i]:.4f}, "
                   f"kept-count CV over rows {f(report['cv_rows'][i])} / over groups {f(report['cv_groups'][i])}")
    pairs = [f"{i + 1}|{j + 1} {report['overlap'][i][j]:.4f}" for i in range(k) for j in range(k)
             if i != j and report["overlap"][i][j] is not None]
    if pairs:
        click.echo(f"  overlap |kept by i and j| / |kept by i| (models numbered as listed): {', '.join(pairs)}")
    for cls, c in report.get("classes", {}).items():
        click.echo(f"  {cls} ({c['tensors']} tensors): density {', '.join(f(x) for x in c['density'])}, of non-zero "
                   f"entries {', '.join(f(x) for x in c['density_of_nonzero'])}; CV over groups "
                   f"{', '.join(f(x) for x in c['cv_groups'])}")
    sec = report["seconds"]
    gb = (report["bytes_read"] + report["bytes_written"]) / 1e9
    click.echo(f"  {report['numel'] / 1e6:.1f} M parameters, {gb:.2f} GB read+written in {sec['total']:.1f} s "
               f"({gb / max(sec['merge'], 1e-9):.2f} GB/s while merging), peak RSS "
               f"{report['peak_rss_bytes'] / 2**20:.0f} MiB")
