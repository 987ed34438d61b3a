"""Kaggle download: only the Kaggle API object is faked; zip handling, checks and moves are real."""

from __future__ import annotations

import builtins
import getpass
import importlib.util
import json
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests

from keras_ham import download
from keras_ham.download import (
    DEFAULT_DATASET,
    DownloadError,
    check_dataset,
    download_dataset,
    find_kaggle_credentials,
    kaggle_config_dir,
    make_kaggle_api,
    setup_kaggle_credentials,
    write_kaggle_credentials,
)
from keras_ham.metadata import IMAGE_PART_DIRS

PART_1_IDS = ["ISIC_0024306", "ISIC_0024307", "ISIC_0024308"]
PART_2_IDS = ["ISIC_0029306", "ISIC_0029307"]


def metadata_csv(image_ids) -> str:
    rows = [f"HAM_{index:07d},{image_id},nv,histo,40.0,male,back" for index, image_id in enumerate(image_ids)]
    return "lesion_id,image_id,dx,dx_type,age,sex,localization\n" + "\n".join(rows) + "\n"


def build_zip(
    path: Path,
    *,
    parts: dict[str, list[str]] | None = None,
    metadata_ids: list[str] | None = None,
    lowercase_copies: bool = True,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A small zip laid out like Kaggle's: metadata CSV, both image folders, their
    lowercase duplicates and an hmnist CSV. Members are stored (not compressed)."""
    parts = {IMAGE_PART_DIRS[0]: PART_1_IDS, IMAGE_PART_DIRS[1]: PART_2_IDS} if parts is None else parts
    all_ids = [i for ids in parts.values() for i in ids]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("HAM10000_metadata.csv", metadata_csv(all_ids if metadata_ids is None else metadata_ids))
        archive.writestr("hmnist_8_8_L.csv", "pixel0000,label\n1,2\n")
        for folder, ids in parts.items():
            for image_id in ids:
                data = f"jpeg bytes of {image_id}".encode()
                archive.writestr(f"{folder}/{image_id}.jpg", data)
                if lowercase_copies:
                    archive.writestr(f"{folder.lower()}/{image_id}.jpg", data)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


class FakeKaggleApi:
    """Stands in for KaggleApi: `dataset_download_files` drops `zip_bytes` into `path`
    (as `<slug>.zip`, like Kaggle) or raises `error`."""

    def __init__(self, zip_bytes: bytes = b"", error: BaseException | None = None):
        self.zip_bytes, self.error, self.calls = zip_bytes, error, []

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False, licenses=()):
        self.calls.append({"dataset": dataset, "path": path, "unzip": unzip})
        if self.error is not None:
            raise self.error
        (Path(path) / (dataset.split("/")[-1] + ".zip")).write_bytes(self.zip_bytes)


def factory(api: FakeKaggleApi):
    return lambda: api


def fetch(out: Path, api: FakeKaggleApi, **kwargs) -> Path:
    """download_dataset with the fake API and no output."""
    return download_dataset(DEFAULT_DATASET, out, api_factory=factory(api), log=lambda message: None, **kwargs)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty HOME with no Kaggle credentials anywhere."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("KAGGLE_CONFIG_DIR", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def credentials(home, monkeypatch) -> None:
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")


@pytest.fixture
def good_zip(tmp_path) -> bytes:
    return build_zip(tmp_path / "good.zip").read_bytes()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- download ----------------------------------------------------------------------------


def test_download_extracts_checks_and_counts(tmp_path, credentials, good_zip):
    api, lines, out = FakeKaggleApi(good_zip), [], tmp_path / "data" / "raw"
    assert download_dataset(DEFAULT_DATASET, out, api_factory=factory(api), log=lines.append) == out
    assert api.calls[0]["dataset"] == DEFAULT_DATASET and api.calls[0]["unzip"] is False
    assert not Path(api.calls[0]["path"]).is_relative_to(out)  # downloaded beside, not into, the target
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["HAM10000_metadata.csv", "hmnist_8_8_L.csv", *IMAGE_PART_DIRS]
    )  # lowercase duplicate folders skipped
    assert (out / IMAGE_PART_DIRS[1] / "ISIC_0029307.jpg").read_bytes() == b"jpeg bytes of ISIC_0029307"
    summary = lines[-1]
    assert "5 metadata rows" in summary and "0 missing" in summary
    assert f"{IMAGE_PART_DIRS[0]}: 3" in summary and f"{IMAGE_PART_DIRS[1]}: 2" in summary
    assert leftovers(out.parent) == []
    assert check_dataset(out).complete


def test_complete_dataset_is_skipped_without_credentials(tmp_path, credentials, good_zip, monkeypatch):
    out = tmp_path / "raw"
    fetch(out, FakeKaggleApi(good_zip))
    monkeypatch.delenv("KAGGLE_USERNAME")
    api, lines = FakeKaggleApi(error=AssertionError("must not be called")), []
    download_dataset(DEFAULT_DATASET, out, api_factory=factory(api), log=lines.append)
    assert api.calls == []
    assert lines[0].startswith("Skipping download") and "--force" in lines[0]


def test_force_downloads_again_and_keeps_unrelated_files(tmp_path, credentials, good_zip):
    out = tmp_path / "raw"
    fetch(out, FakeKaggleApi(good_zip))
    (out / IMAGE_PART_DIRS[0] / "ISIC_stale.jpg").write_bytes(b"old")
    (out / "NOTES.txt").write_text("mine", encoding="utf-8")
    newer = build_zip(tmp_path / "newer.zip", parts={IMAGE_PART_DIRS[0]: ["ISIC_1"], IMAGE_PART_DIRS[1]: ["ISIC_2"]})
    api = FakeKaggleApi(newer.read_bytes())
    fetch(out, api, force=True)
    assert len(api.calls) == 1
    assert sorted(p.name for p in (out / IMAGE_PART_DIRS[0]).iterdir()) == ["ISIC_1.jpg"]  # replaced whole
    assert (out / "NOTES.txt").read_text(encoding="utf-8") == "mine"
    assert check_dataset(out).rows == 2
    assert leftovers(tmp_path) == []


def test_incomplete_target_is_downloaded_again(tmp_path, credentials, good_zip):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "HAM10000_metadata.csv").write_text(metadata_csv(PART_1_IDS), encoding="utf-8")
    api = FakeKaggleApi(good_zip)
    fetch(out, api)
    assert len(api.calls) == 1 and check_dataset(out).complete


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a zip"])
def test_corrupt_zip_is_an_error_and_leaves_nothing(tmp_path, credentials, good_zip, damage):
    if damage == "truncated":
        data = good_zip[: len(good_zip) // 2]
    elif damage == "flipped byte":  # stored member data changed: only the CRC check notices
        position = good_zip.index(b"jpeg bytes of ISIC_0024307")
        data = good_zip[:position] + b"J" + good_zip[position + 1 :]
    else:
        data = b"<html>rate limited</html>"
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match="corrupt or incomplete"):
        fetch(out, FakeKaggleApi(data))
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_zip_without_an_image_folder_is_an_error(tmp_path, credentials):
    data = build_zip(tmp_path / "half.zip", parts={IMAGE_PART_DIRS[0]: PART_1_IDS}).read_bytes()
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("untouched", encoding="utf-8")
    with pytest.raises(DownloadError) as caught:
        fetch(out, FakeKaggleApi(data))
    assert f"{IMAGE_PART_DIRS[1]}/ is missing" in str(caught.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_zip_with_images_missing_for_metadata_rows_is_an_error(tmp_path, credentials):
    data = build_zip(tmp_path / "short.zip", metadata_ids=PART_1_IDS + PART_2_IDS + ["ISIC_0034320"]).read_bytes()
    with pytest.raises(DownloadError, match="1 of 6 images .* ISIC_0034320"):
        fetch(tmp_path / "raw", FakeKaggleApi(data))
    assert not (tmp_path / "raw").exists()


def test_zip_with_only_lowercase_folders_is_renamed(tmp_path, credentials):
    parts = {IMAGE_PART_DIRS[0].lower(): PART_1_IDS, IMAGE_PART_DIRS[1].lower(): PART_2_IDS}
    data = build_zip(tmp_path / "lower.zip", parts=parts, lowercase_copies=False).read_bytes()
    out = tmp_path / "raw"
    fetch(out, FakeKaggleApi(data))
    assert check_dataset(out).complete


def test_unsafe_member_path_is_refused(tmp_path, credentials):
    data = build_zip(tmp_path / "evil.zip", extra={"../../evil.txt": b"x"}).read_bytes()
    with pytest.raises(DownloadError, match="unsafe path"):
        fetch(tmp_path / "a" / "raw", FakeKaggleApi(data))
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a" / "raw").exists()


def test_missing_credentials_are_explained_before_any_api_call(tmp_path, home):
    api = FakeKaggleApi(error=AssertionError("must not be called"))
    with pytest.raises(DownloadError) as caught:
        fetch(tmp_path / "raw", api)
    message = str(caught.value)
    assert "No Kaggle API credentials" in message
    assert "--setup" in message and "KAGGLE_USERNAME" in message and "kaggle.json" in message
    assert api.calls == []
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    "status, hint",
    [(None, "internet connection"), (404, "check --dataset"), (403, "accept the dataset's rules")],
)
def test_network_and_http_errors_are_explained(tmp_path, credentials, status, hint):
    if status is None:
        error = requests.ConnectionError("Failed to resolve 'api.kaggle.com'")
    else:
        response = requests.Response()
        response.status_code = status
        error = requests.HTTPError(f"{status} Client Error", response=response)
    with pytest.raises(DownloadError) as caught:
        fetch(tmp_path / "raw", FakeKaggleApi(error=error))
    assert hint in str(caught.value) and DEFAULT_DATASET in str(caught.value)
    assert leftovers(tmp_path) == [] and not (tmp_path / "raw").exists()


def test_kaggle_exit_is_turned_into_an_error(tmp_path, credentials):
    api = FakeKaggleApi(error=SystemExit(1))
    with pytest.raises(DownloadError, match="SystemExit"):
        fetch(tmp_path / "raw", api)


def test_target_that_is_a_file(tmp_path, credentials):
    (tmp_path / "raw").write_text("x", encoding="utf-8")
    with pytest.raises(DownloadError, match="not a folder"):
        fetch(tmp_path / "raw", FakeKaggleApi())


# --- credentials -------------------------------------------------------------------------


def test_credentials_are_found_where_kaggle_looks(tmp_path, home, monkeypatch):
    assert find_kaggle_credentials() is None
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    assert kaggle_config_dir() == tmp_path / "cfg"
    write_kaggle_credentials("someone", "secret")
    assert find_kaggle_credentials() == str(tmp_path / "cfg" / "kaggle.json")
    (tmp_path / "cfg" / "kaggle.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DownloadError, match="not valid JSON"):
        find_kaggle_credentials()
    monkeypatch.delenv("KAGGLE_CONFIG_DIR")
    (home / ".kaggle").mkdir()
    assert kaggle_config_dir() == home / ".kaggle"
    (home / ".kaggle" / "access_token").write_text("token", encoding="utf-8")
    assert find_kaggle_credentials() == str(home / ".kaggle" / "access_token")
    assert "KAGGLE_API_TOKEN" in find_kaggle_credentials({"KAGGLE_API_TOKEN": "t"})


def test_setup_writes_a_private_kaggle_json(tmp_path, home, monkeypatch):
    answers = iter(["  someone  "])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": "0123456789abcdef")
    folder = tmp_path / "new" / "kaggle"
    path = setup_kaggle_credentials(config_dir=folder, log=lambda m: None)
    assert path == folder / "kaggle.json"
    assert json.loads(path.read_text(encoding="utf-8")) == {"username": "someone", "key": "0123456789abcdef"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [p.name for p in folder.iterdir()] == ["kaggle.json"]  # no temporary file left


def test_setup_asks_before_replacing_and_rejects_empty_keys(tmp_path, home, monkeypatch):
    folder = tmp_path / "cfg"
    write_kaggle_credentials("first", "key1", folder)
    answers = iter(["n"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    setup_kaggle_credentials(config_dir=folder, log=lambda m: None)
    assert json.loads((folder / "kaggle.json").read_text(encoding="utf-8"))["username"] == "first"
    answers = iter(["y", "second"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": "   ")
    with pytest.raises(DownloadError, match="username and an API key"):
        setup_kaggle_credentials(config_dir=folder, log=lambda m: None)
    assert json.loads((folder / "kaggle.json").read_text(encoding="utf-8"))["username"] == "first"


def test_script_setup_then_download(tmp_path, home, monkeypatch, good_zip, repo_root, capsys):
    spec = importlib.util.spec_from_file_location("download_script", repo_root / "scripts" / "download_kaggle.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
    answers = iter(["someone"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": "secret")
    api = FakeKaggleApi(good_zip)
    monkeypatch.setattr(download, "make_kaggle_api", lambda: api)  # the Kaggle boundary only
    out = tmp_path / "raw"
    assert script.main(["--setup", "--out", str(out), "--quiet"]) == 0
    assert stat.S_IMODE((tmp_path / "cfg" / "kaggle.json").stat().st_mode) == 0o600
    assert check_dataset(out).complete and len(api.calls) == 1
    assert "Using Kaggle credentials from " + str(tmp_path / "cfg" / "kaggle.json") in capsys.readouterr().out


def test_script_without_credentials_exits_2_with_a_message(tmp_path, repo_root):
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "scripts/download_kaggle.py", "--out", str(tmp_path / "raw")],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: No Kaggle API credentials") and "--setup" in result.stderr
    assert "Traceback" not in result.stderr


def test_real_kaggle_api_is_imported_lazily_and_authenticates(home, monkeypatch):
    pytest.importorskip("kaggle")
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    api = make_kaggle_api()  # legacy key: no network call
    assert callable(api.dataset_download_files)
