"""`llmpq slurm-profile install|show|remove`: make `snakemake --profile slurm` find this repository's profile.

Snakemake looks up a profile given by name in the working directory, then in the user's config directory
(`platformdirs.user_config_dir("snakemake", "snakemake")`: `$XDG_CONFIG_HOME/snakemake` or
`~/.config/snakemake` on Linux), then the site's. `install` links `<that dir>/slurm` to `profiles/slurm` of
this checkout, so that edits stay in one place. Site settings are read from the environment
(LLMPQ_SLURM_ACCOUNT, LLMPQ_SLURM_PARTITION; `show` prints them and checks them against SLURM when it can).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import platformdirs

from .site import ACCOUNT_VAR, PARTITION_VAR, SiteSettings

PROFILE_SOURCE = Path(__file__).resolve().parents[2] / "profiles" / "slurm"


class ProfileError(RuntimeError):
    """The profile cannot be linked (no checkout, or something else is in the way)."""


def snakemake_profiles_dir() -> Path:
    """Where Snakemake looks for named profiles of this user (its own `get_appdirs().user_config_dir`)."""
    return Path(platformdirs.user_config_dir("snakemake", "snakemake"))


def install(name: str = "slurm", source: Path = PROFILE_SOURCE, force: bool = False) -> Path:
    """Link `<profiles dir>/<name>` to `source`; an existing link is replaced, anything else only with `force`."""
    if not (source / "config.yaml").is_file():
        raise ProfileError(f"{source}: no config.yaml (install from a checkout of the repository)")
    target = snakemake_profiles_dir() / name
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        if not force:
            raise ProfileError(f"{target} exists and is not a link; move it away or pass --force")
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve(), target_is_directory=True)
    return target


def remove(name: str = "slurm") -> Path | None:
    """Remove the link made by `install` (never a directory); the removed path, or None."""
    target = snakemake_profiles_dir() / name
    if target.is_symlink():
        target.unlink()
        return target
    return None


def site_report(site: SiteSettings) -> list[str]:
    """The site settings in effect, checked against sacctmgr / sinfo where they are installed."""
    lines = []
    for var, value, known in ((ACCOUNT_VAR, site.account, _accounts), (PARTITION_VAR, site.partition, _partitions)):
        if value is None:
            lines.append(f"{var} unset: SLURM's default is used")
            continue
        names = known()
        verdict = "" if names is None else (" (known to SLURM)" if value in names else
                                            f" (NOT known to SLURM; known: {', '.join(sorted(names)) or 'none'})")
        lines.append(f"{var}={value}{verdict}")
    return lines


def _accounts() -> set[str] | None:
    return _names(["sacctmgr", "-n", "-P", "show", "assoc", "format=account"])


def _partitions() -> set[str] | None:
    names = _names(["sinfo", "-h", "-o", "%P"])
    return None if names is None else {n.rstrip("*") for n in names}


def _names(cmd: list[str]) -> set[str] | None:
    if shutil.which(cmd[0]) is None:
        return None
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()} if out.returncode == 0 else None


def cli_slurm_profile(args: Any) -> int:
    """`llmpq slurm-profile install|show|remove [--name slurm] [--force]`."""
    target = snakemake_profiles_dir() / args.name
    try:
        if args.action == "install":
            install(args.name, force=args.force)
            print(f"linked {target} -> {PROFILE_SOURCE}; run: snakemake --profile {args.name}")
        elif args.action == "remove":
            print(f"removed {target}" if remove(args.name) else f"{target}: no link to remove")
            return 0
        else:
            where = f"-> {target.resolve()}" if target.is_symlink() else ("(not a link)" if target.exists() else
                                                                        "(not installed)")
            print(f"{target} {where}")
    except ProfileError as exc:
        print(f"llmpq slurm-profile: error: {exc}", file=sys.stderr)
        return 1
    for line in site_report(SiteSettings.from_env()):
        print(line)
    return 0
