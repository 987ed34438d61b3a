"""Metadata reading and image lookup: every bad input names the file and the CSV line."""

from __future__ import annotations

from pathlib import Path

import pytest

from keras_ham.io_utils import write_csv_atomic
from keras_ham.metadata import (
    IMAGE_PART_DIRS,
    MetadataError,
    candidate_image_dirs,
    index_images,
    locate_images,
    read_metadata,
    require_image_paths,
)

HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
ROWS = [
    "HAM_0000001,ISIC_0000001,nv,histo,45.0,male,back\n",
    "HAM_0000001,ISIC_0000002,nv,histo,45.0,male,back\n",
    "HAM_0000002,ISIC_0000003,mel,histo,,female,face\n",
    "HAM_0000003,ISIC_0000004,bkl,consensus,80.0,male,scalp\n",
]


def write(tmp_path: Path, text: str, name: str = "meta.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_all_columns_as_strings(tmp_path):
    frame = read_metadata(write(tmp_path, HEADER + "".join(ROWS)))
    assert list(frame.columns) == HEADER.strip().split(",")
    assert list(frame["image_id"]) == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003", "ISIC_0000004"]
    assert frame.loc[2, "age"] == ""  # blank optional value stays blank, not NaN
    assert frame.loc[0, "age"] == "45.0"  # not re-formatted as a float


def test_round_trip_through_write_csv_atomic_is_byte_identical(tmp_path):
    source = write(tmp_path, HEADER + "".join(ROWS))
    copy = write_csv_atomic(tmp_path / "copy.csv", read_metadata(source))
    assert copy.read_bytes() == source.read_bytes()


def test_whitespace_around_required_values_is_stripped(tmp_path):
    frame = read_metadata(write(tmp_path, "lesion_id, image_id ,dx\n HAM_1 , ISIC_1 , nv \n"))
    assert (frame.loc[0, "lesion_id"], frame.loc[0, "image_id"], frame.loc[0, "dx"]) == ("HAM_1", "ISIC_1", "nv")


def test_missing_columns_are_named(tmp_path):
    path = write(tmp_path, "lesion_id,image\nHAM_1,ISIC_1\n")
    with pytest.raises(MetadataError) as caught:
        read_metadata(path)
    message = str(caught.value)
    assert str(path) in message
    assert "image_id" in message and "dx" in message
    assert "found lesion_id, image" in message


def test_unknown_labels_name_the_lines(tmp_path):
    rows = ROWS[:2] + ["HAM_0000002,ISIC_0000003,melanoma,histo,50.0,male,back\n"] + ROWS[3:]
    with pytest.raises(MetadataError) as caught:
        read_metadata(write(tmp_path, HEADER + "".join(rows)))
    message = str(caught.value)
    assert "'melanoma'" in message
    assert "line 4" in message  # header is line 1, third data row is line 4
    assert "akiec" in message  # lists the valid labels


def test_duplicate_image_ids_name_the_lines(tmp_path):
    rows = ROWS + ["HAM_0000009,ISIC_0000002,nv,histo,45.0,male,back\n"]
    with pytest.raises(MetadataError) as caught:
        read_metadata(write(tmp_path, HEADER + "".join(rows)))
    message = str(caught.value)
    assert "ISIC_0000002" in message
    assert "lines 3, 6" in message


def test_empty_file(tmp_path):
    with pytest.raises(MetadataError, match="empty"):
        read_metadata(write(tmp_path, ""))


def test_header_only(tmp_path):
    with pytest.raises(MetadataError, match="header but no rows"):
        read_metadata(write(tmp_path, HEADER))


@pytest.mark.parametrize(
    "row, column",
    [
        (",ISIC_0000009,nv,histo,45.0,male,back\n", "lesion_id"),
        ("HAM_0000009, ,nv,histo,45.0,male,back\n", "image_id"),
        ("HAM_0000009,ISIC_0000009,,histo,45.0,male,back\n", "dx"),
    ],
)
def test_blank_required_values_name_column_and_line(tmp_path, row, column):
    with pytest.raises(MetadataError) as caught:
        read_metadata(write(tmp_path, HEADER + ROWS[0] + row))
    assert f"empty '{column}'" in str(caught.value)
    assert "line 3" in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(MetadataError, match="not found"):
        read_metadata(tmp_path / "absent.csv")


def test_required_columns_can_be_narrowed(tmp_path):
    frame = read_metadata(write(tmp_path, "image_id,dx\nISIC_1,nv\n"), required=("image_id", "dx"))
    assert list(frame["dx"]) == ["nv"]


def make_image_tree(tmp_path: Path) -> tuple[Path, Path]:
    root, extra = tmp_path / "raw", tmp_path / "extra"
    (root / IMAGE_PART_DIRS[0]).mkdir(parents=True)
    (root / IMAGE_PART_DIRS[1]).mkdir()
    extra.mkdir()
    (root / IMAGE_PART_DIRS[0] / "ISIC_0000001.jpg").write_bytes(b"x")
    (root / IMAGE_PART_DIRS[1] / "ISIC_0000002.JPG").write_bytes(b"x")
    (extra / "ISIC_0000003.png").write_bytes(b"x")
    (root / IMAGE_PART_DIRS[0] / "ISIC_0000004.txt").write_bytes(b"not an image")
    (root / IMAGE_PART_DIRS[0] / "ISIC_0000005.jpg").mkdir()  # a folder, not an image
    return root, extra


def test_candidate_dirs_order_and_part_folders(tmp_path):
    folders = candidate_image_dirs(tmp_path / "raw" / "meta.csv", [tmp_path / "extra", tmp_path / "raw"])
    assert folders == [
        tmp_path / "extra",
        tmp_path / "extra" / IMAGE_PART_DIRS[0],
        tmp_path / "extra" / IMAGE_PART_DIRS[1],
        tmp_path / "raw",
        tmp_path / "raw" / IMAGE_PART_DIRS[0],
        tmp_path / "raw" / IMAGE_PART_DIRS[1],
    ]  # the CSV folder is listed once although also given


def test_images_are_found_in_part_folders_and_extra_dirs(tmp_path):
    root, extra = make_image_tree(tmp_path)
    ids = ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003", "ISIC_0000004", "ISIC_0000005"]
    located = locate_images(ids, candidate_image_dirs(root / "meta.csv", [extra]))
    assert located["ISIC_0000001"] == root / IMAGE_PART_DIRS[0] / "ISIC_0000001.jpg"
    assert located["ISIC_0000002"] == root / IMAGE_PART_DIRS[1] / "ISIC_0000002.JPG"
    assert located["ISIC_0000003"] == extra / "ISIC_0000003.png"
    assert located["ISIC_0000004"] is None  # .txt is not an image
    assert located["ISIC_0000005"] is None  # a folder is not an image


def test_earlier_folders_win(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "ISIC_1.jpg").write_bytes(b"x")
    (second / "ISIC_1.jpg").write_bytes(b"x")
    assert index_images([second, first, tmp_path / "absent"])["ISIC_1"] == second / "ISIC_1.jpg"


def test_require_image_paths_returns_row_order(tmp_path):
    root, extra = make_image_tree(tmp_path)
    frame = read_metadata(write(root, "lesion_id,image_id,dx\nH2,ISIC_0000003,nv\nH1,ISIC_0000001,mel\n"))
    paths = require_image_paths(frame, root / "meta.csv", [extra])
    assert paths == [extra / "ISIC_0000003.png", root / IMAGE_PART_DIRS[0] / "ISIC_0000001.jpg"]


def test_require_image_paths_names_the_missing_ids(tmp_path):
    root, _ = make_image_tree(tmp_path)
    frame = read_metadata(write(root, HEADER + "".join(ROWS)))
    with pytest.raises(MetadataError) as caught:
        require_image_paths(frame, root / "meta.csv")
    message = str(caught.value)
    assert "2 of 4 image(s) not found" in message
    assert "ISIC_0000003" in message and "ISIC_0000004" in message
    assert "ISIC_0000001" not in message.split("searched")[0]
    assert "--images" in message


def test_a_column_repeated_in_the_header_is_named(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("lesion_id,image_id,dx, dx\nHAM_1,ISIC_1,nv,nv\n")
    with pytest.raises(MetadataError, match=r"meta.csv: column\(s\) dx appear more than once"):
        read_metadata(path)


ISIC_HEADER = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"


def test_isic2018_ground_truth_is_read_as_image_id_and_dx(tmp_path):
    from keras_ham.metadata import read_labelled_csv

    path = tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv"
    path.write_text(ISIC_HEADER + "ISIC_0034524,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"
                    "ISIC_0034525,1,0,0,0,0,0,0\nISIC_0034526,0,0,0,0,0,0,1.0\n")
    frame = read_labelled_csv(path)
    assert frame["image_id"].tolist() == ["ISIC_0034524", "ISIC_0034525", "ISIC_0034526"]
    assert frame["dx"].tolist() == ["nv", "mel", "vasc"]
    split = tmp_path / "split.csv"  # the image_id,dx format is still read as before
    split.write_text("image_id,dx,lesion_id\nISIC_1,bkl,L1\n")
    assert read_labelled_csv(split)["dx"].tolist() == ["bkl"]


@pytest.mark.parametrize("body, message", [
    (ISIC_HEADER + "ISIC_1,1,0,0,0,0,0,0\nISIC_2,0,1,0,0,0,0,0\nISIC_1,0,0,1,0,0,0,0\n",
     r"duplicate image id\(s\) ISIC_1 at lines 2, 4"),
    (ISIC_HEADER + "ISIC_1,1,0,0,0,0,0,0\nISIC_2,1,1,0,0,0,0,0\n", r"not one-hot at line 3 \(first: '1,1,0"),
    (ISIC_HEADER + "ISIC_1,0,0,0,0,0,0,0\n", "not one-hot at line 2"),
    (ISIC_HEADER + "ISIC_1,0.5,0.5,0,0,0,0,0\n", "not one-hot at line 2"),
    (ISIC_HEADER + "ISIC_1,yes,0,0,0,0,0,0\n", "not one-hot at line 2"),
    ("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC,SCC\nISIC_1,1,0,0,0,0,0,0,0\n", "unknown column.* SCC"),
    ("image,MEL,NV,BCC,AKIEC,BKL,DF\nISIC_1,1,0,0,0,0,0\n", "missing column.* VASC"),
    ("MEL,NV,BCC,AKIEC,BKL,DF,VASC\n1,0,0,0,0,0,0\n", "missing column.* image"),
    (ISIC_HEADER, "header but no rows"),
    (ISIC_HEADER + ",1,0,0,0,0,0,0\n", "empty 'image' at line 2"),
])
def test_malformed_isic2018_ground_truth_names_file_and_rows(tmp_path, body, message):
    from keras_ham.metadata import read_labelled_csv

    path = tmp_path / "truth.csv"
    path.write_text(body)
    with pytest.raises(MetadataError, match=message) as error:
        read_labelled_csv(path)
    assert str(path) in str(error.value)
