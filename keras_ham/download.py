"""Download HAM10000 from Kaggle into the layout the rest of the project reads.

    data/raw/HAM10000_metadata.csv
    data/raw/HAM10000_images_part_1/ISIC_*.jpg   (5,000 images)
    data/raw/HAM10000_images_part_2/ISIC_*.jpg   (5,015 images)

The zip is downloaded and extracted into a temporary folder beside the target, checked,
and only then moved into place, so an interrupted or corrupt download never leaves a
half-extracted tree. The Kaggle zip also holds lowercase copies of both image folders
(`ham10000_images_part_1/2`, 2.6 GB of duplicates) and `hmnist_*.csv`; the copies are
skipped, the CSVs kept.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from keras_ham.errors import KerasHamError
from keras_ham.io_utils import atomic_path
from keras_ham.metadata import IMAGE_PART_DIRS, MetadataError, index_images, read_metadata

DEFAULT_DATASET = "kmader/skin-cancer-mnist-ham10000"
METADATA_FILE = "HAM10000_metadata.csv"
KAGGLE_JSON = "kaggle.json"
CREDENTIALS_HELP = (
    "Provide Kaggle API credentials in one of these ways:\n"
    "  1. run this script with --setup (asks for your username and API key, writes {config})\n"
    "  2. create an API token at https://www.kaggle.com/settings/api ('Create New Token') and save the\n"
    "     downloaded kaggle.json as {config} (chmod 600), or point KAGGLE_CONFIG_DIR at its folder\n"
    "  3. set the environment variables KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN)"
)


class DownloadError(KerasHamError, RuntimeError):
    """The dataset could not be downloaded or is incomplete; the message says what to do."""


@dataclass
class DatasetCheck:
    """What a dataset folder holds; `complete` when nothing is missing."""

    folder: Path
    rows: int = 0
    images_per_folder: dict[str, int] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems and not self.missing_images

    def summary(self) -> str:
        folders = ", ".join(f"{name}: {count}" for name, count in self.images_per_folder.items())
        return f"{self.rows} metadata rows; images {folders or 'none'}; {len(self.missing_images)} missing"


def check_dataset(folder: str | os.PathLike) -> DatasetCheck:
    """Check `folder` for the metadata CSV, both image folders and an image for every row."""
    folder = Path(folder)
    check = DatasetCheck(folder=folder)
    for part in IMAGE_PART_DIRS:
        if (folder / part).is_dir():
            check.images_per_folder[part] = len(index_images([folder / part]))
        else:
            check.problems.append(f"{part}/ is missing")
    metadata_path = folder / METADATA_FILE
    if not metadata_path.is_file():
        check.problems.append(f"{METADATA_FILE} is missing")
        return check
    try:
        frame = read_metadata(metadata_path)
    except MetadataError as error:
        check.problems.append(str(error))
        return check
    check.rows = len(frame)
    found = index_images([folder / part for part in IMAGE_PART_DIRS])
    check.missing_images = [image_id for image_id in frame["image_id"] if image_id not in found]
    return check


def kaggle_config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The folder the kaggle package reads kaggle.json from (same rules as kaggle 1.6-2.x):
    $KAGGLE_CONFIG_DIR, else ~/.kaggle, else (Linux, when ~/.kaggle is absent)
    $XDG_CONFIG_HOME/kaggle or ~/.config/kaggle."""
    environ = os.environ if environ is None else environ
    if environ.get("KAGGLE_CONFIG_DIR"):
        return Path(environ["KAGGLE_CONFIG_DIR"]).expanduser()
    home = Path(os.path.expanduser("~"))
    legacy = home / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"
    return legacy


def find_kaggle_credentials(environ: Mapping[str, str] | None = None) -> str | None:
    """Where usable Kaggle credentials are (a short description), or None.

    Looks where the kaggle package looks: KAGGLE_USERNAME + KAGGLE_KEY, KAGGLE_API_TOKEN,
    kaggle.json in `kaggle_config_dir()`, ~/.kaggle/access_token, and the OAuth file
    ~/.kaggle/credentials.json written by `kaggle auth login`. Raises `DownloadError`
    for a kaggle.json that is not a JSON object.
    """
    environ = os.environ if environ is None else environ
    if environ.get("KAGGLE_API_TOKEN"):
        return "the KAGGLE_API_TOKEN environment variable"
    values: dict[str, Any] = {}
    config = kaggle_config_dir(environ) / KAGGLE_JSON
    if config.is_file():
        try:
            loaded = json.loads(config.read_text(encoding="utf-8") or "{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DownloadError(
                f"{config}: not valid JSON ({error}); expected {{\"username\": ..., \"key\": ...}}."
            ) from None
        if not isinstance(loaded, dict):
            raise DownloadError(f"{config}: expected a JSON object {{\"username\": ..., \"key\": ...}}.")
        values.update(loaded)
    for key in ("username", "key"):
        if environ.get(f"KAGGLE_{key.upper()}"):
            values[key] = environ[f"KAGGLE_{key.upper()}"]
    if values.get("username") and values.get("key"):
        from_env = [k for k in ("KAGGLE_USERNAME", "KAGGLE_KEY") if environ.get(k)]
        return " and ".join([*([str(config)] if len(from_env) < 2 else []), *from_env])
    home = Path(os.path.expanduser("~")) / ".kaggle"
    for name in ("access_token", "access_token.txt", "credentials.json"):
        if (home / name).is_file() and (home / name).stat().st_size > 0:
            return str(home / name)
    return None


def require_kaggle_credentials(environ: Mapping[str, str] | None = None) -> str:
    """`find_kaggle_credentials`, or `DownloadError` explaining how to provide them."""
    source = find_kaggle_credentials(environ)
    if source is None:
        config = kaggle_config_dir(environ) / KAGGLE_JSON
        raise DownloadError("No Kaggle API credentials found.\n" + CREDENTIALS_HELP.format(config=config))
    return source


def write_kaggle_credentials(username: str, key: str, config_dir: str | os.PathLike | None = None) -> Path:
    """Write kaggle.json ({"username", "key"}) atomically with mode 600 (folder 700)."""
    username, key = username.strip(), key.strip()
    if not username or not key:
        raise DownloadError("Both a Kaggle username and an API key are needed; nothing was written.")
    folder = Path(config_dir) if config_dir is not None else kaggle_config_dir()
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)
    path = folder / KAGGLE_JSON
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)  # before the secret is written
        tmp.write_text(json.dumps({"username": username, "key": key}) + "\n", encoding="utf-8")
    return path


def setup_kaggle_credentials(
    *,
    config_dir: str | os.PathLike | None = None,
    ask: Callable[[str], str] | None = None,
    ask_secret: Callable[[str], str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Ask for a Kaggle username and API key (the key without echo) and write kaggle.json.

    `ask` / `ask_secret` default to `input` / `getpass.getpass`, looked up at call time."""
    ask = ask or input
    ask_secret = ask_secret or getpass.getpass
    folder = Path(config_dir) if config_dir is not None else kaggle_config_dir()
    path = folder / KAGGLE_JSON
    log(f"Kaggle credentials will be saved to {path} (readable only by you).")
    log("Find them at https://www.kaggle.com/settings/api: 'Create New Token' downloads a kaggle.json with both.")
    if path.exists():
        answer = ask(f"{path} exists. Replace it? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            log("Kept the existing credentials.")
            return path
    try:
        username = ask("Kaggle username: ")
        key = ask_secret("Kaggle API key (not shown): ")
    except EOFError:
        raise DownloadError("No input to read the Kaggle username and key from; nothing was written.") from None
    written = write_kaggle_credentials(username, key, folder)
    log(f"Wrote {written}")
    return written


def make_kaggle_api() -> Any:
    """An authenticated `kaggle.api.kaggle_api_extended.KaggleApi`.

    Imported lazily: importing kaggle authenticates at import time and calls exit()
    without credentials, so both are turned into `DownloadError`.
    """
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except (ImportError, SystemExit, Exception) as error:  # noqa: BLE001 - any import failure
        raise DownloadError(
            f"Could not import the kaggle package ({type(error).__name__}: {error}); "
            "install it with: pip install kaggle"
        ) from None
    api = KaggleApi()
    try:
        api.authenticate()
    except (SystemExit, Exception) as error:  # noqa: BLE001 - kaggle calls exit(1) on bad credentials
        raise DownloadError(
            f"Kaggle rejected the credentials ({type(error).__name__}: {error}).\n"
            + CREDENTIALS_HELP.format(config=kaggle_config_dir() / KAGGLE_JSON)
        ) from None
    return api


def _describe_api_error(dataset: str, error: BaseException) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        hint = "Kaggle refused access: check your credentials, and accept the dataset's rules on its Kaggle page."
    elif status == 404:
        hint = f"Kaggle has no dataset '{dataset}': check --dataset (owner/name)."
    else:
        hint = "Check your internet connection (and any proxy), then run again."
    return f"Downloading {dataset} from Kaggle failed ({type(error).__name__}: {error}). {hint}"


def _member_targets(archive: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Members to extract and their relative targets: unsafe paths rejected, lowercase
    image-folder copies skipped (or renamed when the canonical folder is absent)."""
    canonical = {part.lower(): part for part in IMAGE_PART_DIRS}
    tops = {PurePosixPath(info.filename).parts[0] for info in archive.infolist() if info.filename.strip("/")}
    targets = []
    for info in archive.infolist():
        if info.is_dir():
            continue
        relative = PurePosixPath(info.filename.replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts or not relative.parts or ":" in relative.parts[0]:
            raise DownloadError(f"The archive holds an unsafe path {info.filename!r}; refusing to extract it.")
        top = relative.parts[0]
        if len(relative.parts) > 1 and top.lower() in canonical and top != canonical[top.lower()]:
            if canonical[top.lower()] in tops:
                continue  # duplicate copy of a canonical folder
            relative = PurePosixPath(canonical[top.lower()], *relative.parts[1:])
        targets.append((info, relative))
    return targets


def _extract_zip(zip_path: Path, destination: Path, log: Callable[[str], None]) -> None:
    """Extract `zip_path` into `destination`; CRCs are checked while reading each member."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            targets = _member_targets(archive)
            report_every = max(1, len(targets) // 10)
            for done, (info, relative) in enumerate(targets, start=1):
                target = destination.joinpath(*relative.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                if len(targets) >= 1000 and done % report_every == 0:
                    log(f"  extracted {done}/{len(targets)} files")
    except (zipfile.BadZipFile, zlib.error, EOFError, zipfile.LargeZipFile) as error:
        raise DownloadError(
            f"The downloaded archive {zip_path.name} is corrupt or incomplete ({error}). "
            "Run again (with --force if needed) to download it afresh."
        ) from None


def _move_into_place(extracted: Path, out_dir: Path, trash: Path) -> None:
    """Rename the extracted tree into `out_dir`; entries it replaces go to `trash` first
    and are put back if a rename fails. Entries the archive lacks (a README) stay."""
    if not out_dir.exists():
        os.replace(extracted, out_dir)
        return
    trash.mkdir(exist_ok=True)
    done: list[tuple[Path, Path, Path | None]] = []  # (new entry, target, old entry's backup)
    try:
        for entry in sorted(extracted.iterdir()):
            target, backup = out_dir / entry.name, None
            if target.exists() or target.is_symlink():
                backup = trash / entry.name
                os.replace(target, backup)
            done.append((entry, target, backup))
            os.replace(entry, target)
    except OSError:
        for entry, target, backup in reversed(done):
            if not entry.exists() and (target.exists() or target.is_symlink()):
                os.replace(target, entry)
            if backup is not None and backup.exists():
                os.replace(backup, target)
        raise


def download_dataset(
    dataset: str,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    api_factory: Callable[[], Any] | None = None,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Download and extract Kaggle `dataset` (owner/name) into `out_dir`; return `out_dir`.

    Skips the download when `out_dir` already holds a complete dataset, unless `force`.
    `api_factory` returns an object with `dataset_download_files(dataset, path=,
    unzip=False, quiet=)` (default: the authenticated Kaggle API; tests pass a fake).
    Raises `DownloadError` for missing credentials, network or HTTP failures, a corrupt
    zip or an archive without the HAM10000 layout; `out_dir` is then left as it was.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DownloadError(f"{out_dir} exists and is not a folder; choose another --out.")
    if out_dir.is_dir() and not force:
        existing = check_dataset(out_dir)
        if existing.complete:
            log(f"Skipping download: {out_dir} already holds the complete dataset ({existing.summary()}). "
                "Use --force to download it again.")
            return out_dir
    source = require_kaggle_credentials()
    log(f"Using Kaggle credentials from {source}.")
    api = (api_factory or make_kaggle_api)()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.download-", dir=out_dir.parent))
    try:
        download_folder, extracted = staging / "zip", staging / "extracted"
        download_folder.mkdir()
        extracted.mkdir()
        log(f"Downloading {dataset} from Kaggle (about 5 GB for HAM10000) into {staging}...")
        try:
            api.dataset_download_files(dataset, path=str(download_folder), unzip=False, quiet=quiet)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - requests, HTTP and kaggle's exit()
            raise DownloadError(_describe_api_error(dataset, error)) from None
        archives = sorted(download_folder.glob("*.zip"))
        if len(archives) != 1:
            found = ", ".join(p.name for p in download_folder.iterdir()) or "nothing"
            raise DownloadError(f"Expected one zip from Kaggle for {dataset}, found {found}.")
        log(f"Extracting {archives[0].name} ({archives[0].stat().st_size / 1e9:.2f} GB)...")
        _extract_zip(archives[0], extracted, log)
        archives[0].unlink()  # free the space before the move
        check = check_dataset(extracted)
        if not check.complete:
            problems = list(check.problems)
            if check.missing_images:
                problems.append(
                    f"{len(check.missing_images)} of {check.rows} images listed in {METADATA_FILE} are not in "
                    f"{' or '.join(IMAGE_PART_DIRS)} (first: {', '.join(check.missing_images[:5])})"
                )
            raise DownloadError(
                f"The archive of {dataset} does not hold the expected HAM10000 layout: {'; '.join(problems)}. "
                f"Nothing was written to {out_dir}."
            )
        _move_into_place(extracted, out_dir, staging / "replaced")
    except OSError as error:
        raise DownloadError(
            f"Could not write the dataset beside {out_dir} ({error}); check the free disk space."
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"Downloaded {dataset} into {out_dir}: {check.summary()}.")
    return out_dir
