"""The database readers on hand-made trees with the quirks of datasets.md, and their bad-input messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from handmade import (
    CASME2_ROWS,
    CASME2_SAMPLES,
    CASME2_SKIPPED,
    CASME3_SAMPLES,
    CASME3_SKIPPED,
    SAMM_SAMPLES,
    SAMM_SKIPPED,
    assert_user_message,
    build_casme2,
    build_casme3,
    build_samm,
    build_smic,
    casme2_sheet_rows,
    touch_frames,
    write_workbook,
)

from partitions.adapters import ADAPTERS, get_adapter, read_site
from partitions.errors import DataError
from partitions.records import ActionUnit, SiteIndex


def by_key(index: SiteIndex) -> dict[str, object]:
    """Samples by ``subject/clip_id``."""
    return {f"{s.subject}/{s.clip_id}": s for s in index.samples}


def skipped_entries(index: SiteIndex) -> set[str]:
    """``subject/clip_id`` of the skipped entries (the part before the source in brackets)."""
    return {s.entry.split(" (")[0] for s in index.skipped}


# ----------------------------------------------------------------------------- registry


def test_registry_holds_every_database_with_its_frame_rate() -> None:
    assert {name: a.fps for name, a in ADAPTERS.items()} == {
        "casme2": 200.0,
        "samm": 200.0,
        "smic": 100.0,
        "smic-vis": 25.0,
        "smic-nir": 25.0,
        "casme3": 30.0,
    }


@pytest.mark.parametrize(("alias", "name"), [("CASME_2", "casme2"), ("casmeii", "casme2"), ("SMIC-HS", "smic")])
def test_aliases(alias: str, name: str) -> None:
    assert get_adapter(alias).name == name


def test_unknown_dataset_lists_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        read_site("casme4", tmp_path)
    assert_user_message(error, "casme4", "casme2", "samm", "smic-vis", "casme3")


# ----------------------------------------------------------------------------- CASME II


@pytest.mark.parametrize("layout", ["2014", "2019"])
def test_casme2_reads_both_sheet_layouts(tmp_path: Path, layout: str) -> None:
    index = read_site("casme2", build_casme2(tmp_path, layout=layout))
    assert index.database == "casme2"
    assert len(index.samples) == CASME2_SAMPLES
    assert skipped_entries(index) == CASME2_SKIPPED
    samples = by_key(index)
    first = samples["sub01/EP02_01f"]
    assert first.fps == 200.0
    assert (first.onset, first.apex, first.offset) == (8, 10, 12)
    assert first.frame_numbers == (8, 9, 10, 11, 12)  # numeric, not lexical, order
    assert [p.name for p in first.frames] == ["img8.jpg", "img9.jpg", "img10.jpg", "img11.jpg", "img12.jpg"]
    assert first.action_units == (ActionUnit(12, None, "12"),)
    assert (
        first.source == f"{'CASME2-coding-20190701.xlsx' if layout == '2019' else 'CASME2-coding-20140508.xlsx'} row 2"
    )
    assert not first.precropped


def test_casme2_row_quirks(tmp_path: Path) -> None:
    samples = by_key(read_site("casme2", build_casme2(tmp_path)))
    assert samples["sub01/EP03_02"].apex is None  # '/' in the apex cell
    assert samples["sub03/EP07_01"].apex is None  # blank apex cell
    assert samples["sub02/EP01_01"].emotion == "others"  # 'Others' lowercased
    assert samples["sub01/EP03_02"].action_units == (ActionUnit(4, None, "4"), ActionUnit(10, "L", "L10"))


def test_casme2_skips_missing_folders_and_onsets_outside_the_frames(tmp_path: Path) -> None:
    index = read_site("casme2", build_casme2(tmp_path))
    reasons = {s.entry.split(" (")[0]: s for s in index.skipped}
    assert "no frame folder" in reasons["sub02/EP05_03"].reason
    assert "row 5" in reasons["sub02/EP05_03"].entry
    assert "onset frame 25" in reasons["sub03/EP06_01"].reason


def test_casme2_subject_folders_without_sub_prefix(tmp_path: Path) -> None:
    index = read_site("casme2", build_casme2(tmp_path, sub_prefix=False))
    assert len(index.samples) == CASME2_SAMPLES
    assert {s.subject for s in index.samples} == {"sub01", "sub02", "sub03", "sub04"}


def test_casme2_cropped_release_is_marked_precropped(tmp_path: Path) -> None:
    index = read_site("casme2", build_casme2(tmp_path, release="cropped"))
    assert len(index.samples) == CASME2_SAMPLES
    assert all(s.precropped for s in index.samples)
    assert index.samples[0].frames[0].name == "reg_img8.jpg"


def test_casme2_prefers_raw_frames_when_both_releases_exist(tmp_path: Path) -> None:
    index = read_site("casme2", build_casme2(tmp_path, release="both"))
    assert len(index.samples) == CASME2_SAMPLES
    assert not any(s.precropped for s in index.samples)
    assert all("CASME2_RAW_selected" in str(s.frames[0]) for s in index.samples)


def test_casme2_reads_the_newest_sheet_when_two_are_present(tmp_path: Path) -> None:
    build_casme2(tmp_path, layout="2019")
    write_workbook(tmp_path / "CASME2-coding-20140508.xlsx", {"Sheet1": casme2_sheet_rows("2014", CASME2_ROWS[:1])})
    index = read_site("casme2", tmp_path)
    assert len(index.samples) == CASME2_SAMPLES
    assert index.samples[0].source.startswith("CASME2-coding-20190701.xlsx")


def test_casme2_sheet_without_expected_columns(tmp_path: Path) -> None:
    rows = casme2_sheet_rows("2019")
    rows[0] = ["Subject", "Filename", None, "OnsetFrame", "ApexFrame", "OffsetFrame", None, "Action Units", "Mood"]
    build_casme2(tmp_path)
    sheet = write_workbook(tmp_path / "CASME2-coding-20190701.xlsx", {"Sheet1": rows})
    with pytest.raises(DataError) as error:
        read_site("casme2", tmp_path)
    assert_user_message(error, str(sheet), "Estimated Emotion", "closest row", "row 1", "rename the header cells")


def test_casme2_unknown_emotion_names_file_row_and_column(tmp_path: Path) -> None:
    rows = [*CASME2_ROWS[:2], (5, "EP10_01", 1, 2, 3, "12", "joy", range(1, 4))]
    build_casme2(tmp_path, rows=rows)
    with pytest.raises(DataError) as error:
        read_site("casme2", tmp_path)
    assert_user_message(
        error,
        "CASME2-coding-20190701.xlsx",
        "row 4",
        "'Estimated Emotion'",
        "'joy'",
        "happiness",
        "Correct its spelling",
    )


def test_casme2_without_sheet(tmp_path: Path) -> None:
    build_casme2(tmp_path)
    (tmp_path / "CASME2-coding-20190701.xlsx").unlink()
    with pytest.raises(DataError) as error:
        read_site("casme2", tmp_path)
    assert_user_message(error, str(tmp_path), "no CASME II annotation sheet", "CASME2-coding-YYYYMMDD.xlsx", "--root")


def test_casme2_sheet_with_no_rows_is_an_empty_site(tmp_path: Path) -> None:
    build_casme2(tmp_path, rows=[])
    with pytest.raises(DataError) as error:
        read_site("casme2", tmp_path)
    assert_user_message(error, "site is empty", "CASME2_RAW_selected")


def test_casme2_site_whose_frames_are_all_missing(tmp_path: Path) -> None:
    build_casme2(tmp_path)
    shutil.rmtree(tmp_path / "CASME2_RAW_selected")
    with pytest.raises(DataError) as error:
        read_site("casme2", tmp_path)
    assert_user_message(error, "none of the 8", "no frame folder", "Point --root")


def test_casme2_empty_clip_folder_is_skipped(tmp_path: Path) -> None:
    build_casme2(tmp_path)
    for frame in (tmp_path / "CASME2_RAW_selected" / "sub04" / "EP08_01").iterdir():
        frame.unlink()
    index = read_site("casme2", tmp_path)
    assert "sub04/EP08_01" in skipped_entries(index)
    assert any("holds no frames" in s.reason for s in index.skipped)


# ----------------------------------------------------------------------------- SAMM


@pytest.mark.parametrize("notes_above", [True, False])
@pytest.mark.parametrize("under_samm", [True, False])
def test_samm_both_sheet_releases_and_both_frame_roots(tmp_path: Path, notes_above: bool, under_samm: bool) -> None:
    index = read_site("samm", build_samm(tmp_path, notes_above=notes_above, under_samm=under_samm))
    assert len(index.samples) == SAMM_SAMPLES
    assert skipped_entries(index) == SAMM_SKIPPED
    first = by_key(index)["006/006_1_2"]
    assert first.fps == 200.0
    assert first.emotion == "anger"
    assert (first.onset, first.apex, first.offset) == (5562, 5564, 5566)
    assert first.frame_numbers == tuple(range(5560, 5569))
    assert first.frames[0].name == "006_05560.jpg"
    assert first.action_units == (ActionUnit(4, None, "4"), ActionUnit(7, None, "7"))
    assert first.other_codes == ("A1",)
    assert first.source == f"SAMM_Micro_FACS_Codes_v2.xlsx row {15 if notes_above else 2}"


def test_samm_subject_cells_and_int_aus(tmp_path: Path) -> None:
    samples = by_key(read_site("samm", build_samm(tmp_path)))
    assert {s.subject for s in samples.values()} == {"006", "007", "011", "016"}
    assert samples["007/007_3_1"].action_units == (ActionUnit(12, None, "12"),)
    assert samples["011/011_2_1"].other_codes == ("T",)


def test_samm_on_a_casme2_tree_names_the_right_dataset(tmp_path: Path) -> None:
    build_casme2(tmp_path)
    with pytest.raises(DataError) as error:
        read_site("samm", tmp_path)
    assert_user_message(error, "--dataset samm", "CASME II", "CASME2-coding-20190701.xlsx", "--dataset casme2")


def test_samm_unknown_emotion(tmp_path: Path) -> None:
    rows = [(6, "006_1_2", 5562, 5564, 5566, "4", "Angry", range(5560, 5569))]
    build_samm(tmp_path, rows=rows)
    with pytest.raises(DataError) as error:
        read_site("samm", tmp_path)
    assert_user_message(error, "SAMM_Micro_FACS_Codes_v2.xlsx", "MICRO_ONLY", "row 15", "'Angry'", "contempt")


# ----------------------------------------------------------------------------- SMIC


def test_smic_hs_naming_variants_padded_subjects_and_non_micro(tmp_path: Path) -> None:
    index = read_site("smic", build_smic(tmp_path))
    samples = by_key(index)
    assert set(samples) == {"s1/s1_ne_01", "s1/s1_po_01", "s2/s2_sur_01", "s2/s2_ne_03", "s3/s3_po_02"}
    assert skipped_entries(index) == {"s3/s3_ne_02"}
    assert not any("_nm" in key for key in samples)  # non_micro/ is not read
    plain, reg_image, reg = samples["s1/s1_ne_01"], samples["s2/s2_sur_01"], samples["s3/s3_po_02"]
    assert plain.frame_numbers == (98, 99, 100, 101)
    assert plain.frames[-1].name == "image000101.bmp"
    assert (plain.emotion, plain.fps, plain.onset, plain.apex, plain.offset) == ("negative", 100.0, None, None, None)
    assert plain.action_units == () and not plain.has_action_units
    assert not plain.precropped
    assert reg_image.precropped and reg_image.frame_numbers == (5, 6, 7, 8)
    assert reg.precropped and reg.frame_numbers == tuple(range(1, 12))
    assert plain.source == "HS/s1/micro/negative/s1_ne_01"


@pytest.mark.parametrize(("dataset", "fps", "variant"), [("smic-vis", 25.0, "VIS"), ("smic-nir", 25.0, "NIR")])
def test_smic_vis_and_nir(tmp_path: Path, dataset: str, fps: float, variant: str) -> None:
    index = read_site(dataset, build_smic(tmp_path))
    assert index.database == dataset
    assert len(index.samples) == 2
    assert all(s.fps == fps and variant in s.source and not s.has_action_units for s in index.samples)


def test_smic_root_may_be_the_variant_folder_itself(tmp_path: Path) -> None:
    build_smic(tmp_path, variants=("HS",))
    index = read_site("smic", tmp_path / "HS")
    assert len(index.samples) == 5


def test_smic_vis_on_an_hs_only_tree_says_use_smic(tmp_path: Path) -> None:
    build_smic(tmp_path, variants=("HS",))
    with pytest.raises(DataError) as error:
        read_site("smic-vis", tmp_path)
    assert_user_message(error, "--dataset smic-vis", "SMIC-HS", "HS/", "Use --dataset smic")


def test_smic_unknown_emotion_folder(tmp_path: Path) -> None:
    build_smic(tmp_path, variants=("HS",))
    touch_frames(tmp_path / "HS" / "s1" / "micro" / "happy" / "s1_ha_01", ["image000001.bmp"])
    with pytest.raises(DataError) as error:
        read_site("smic", tmp_path)
    assert_user_message(error, "happy", "folder name", "negative, positive, surprise")


def test_smic_without_clips_is_an_empty_site(tmp_path: Path) -> None:
    (tmp_path / "HS" / "s1" / "micro").mkdir(parents=True)
    with pytest.raises(DataError) as error:
        read_site("smic", tmp_path)
    assert_user_message(error, "SMIC-HS site is empty", "HS/s1/micro/negative")


# ----------------------------------------------------------------------------- CAS(ME)^3


def test_casme3_both_frame_layouts_text_indices_and_folder_case(tmp_path: Path) -> None:
    index = read_site("casme3", build_casme3(tmp_path))
    samples = by_key(index)
    assert len(index.samples) == CASME3_SAMPLES
    assert skipped_entries(index) == CASME3_SKIPPED
    whole_task = samples["spNO.1/a_355"]  # folder spelled spNo.1, frames of the whole task on disk
    assert (whole_task.onset, whole_task.apex, whole_task.offset) == (355, 360, 365)
    assert whole_task.frame_numbers == tuple(range(355, 366))  # onset..offset cut out of 340..380
    assert whole_task.frames[0].parent.name == "color"
    assert whole_task.fps == 30.0
    text_cells = samples["spNO.1/a_370"]  # second ME of the same task, indices stored as text
    assert (text_cells.onset, text_cells.apex, text_cells.offset) == (370, 372, 375)
    assert text_cells.emotion == "others"
    per_clip = samples["spNO.2/b_100"]
    assert per_clip.frames[0].parent.name == "spNO.2_b_100"
    assert per_clip.frame_numbers == tuple(range(100, 107))
    assert per_clip.action_units == (ActionUnit(12, None, "12"),)
    assert samples["spNO.3/d_200"].apex is None
    assert samples["spNO.1/b_20"].frame_numbers == (20, 21, 22, 23, 24)  # task folder spelled B


def test_casme3_skip_reasons(tmp_path: Path) -> None:
    index = read_site("casme3", build_casme3(tmp_path))
    reasons = {s.entry.split(" (")[0]: s.reason for s in index.skipped}
    assert "offset frame 70" in reasons["spNO.2/c_50"]
    assert "no frame folder" in reasons["spNO.3/a_10"]


def test_casme3_unknown_emotion(tmp_path: Path) -> None:
    build_casme3(tmp_path, rows=[("spNO.1", "a", 355, 360, 365, "12", "happiness")])
    with pytest.raises(DataError) as error:
        read_site("casme3", tmp_path)
    assert_user_message(error, "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx", "'label'", "row 2", "'happiness'", "happy")


def test_casme3_on_a_samm_tree(tmp_path: Path) -> None:
    build_samm(tmp_path)
    with pytest.raises(DataError) as error:
        read_site("casme3", tmp_path)
    assert_user_message(error, "SAMM", "--dataset samm")


def test_root_that_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        read_site("casme3", tmp_path / "nowhere")
    assert_user_message(error, "nowhere", "is not a folder")


def test_notes_under_the_table_are_passed_over(tmp_path: Path) -> None:
    build_casme2(tmp_path)
    rows = [*casme2_sheet_rows("2019"), [None], ["Note: frames are numbered as in the raw video"]]
    write_workbook(tmp_path / "CASME2-coding-20190701.xlsx", {"Sheet1": rows})
    index = read_site("casme2", tmp_path)
    assert len(index.samples) == CASME2_SAMPLES
    assert skipped_entries(index) == CASME2_SKIPPED


def test_row_with_a_filename_but_no_subject_number(tmp_path: Path) -> None:
    rows = [*CASME2_ROWS[:1], ("subject x", "EP10_01", 1, 2, 3, "12", "happiness", None)]
    build_casme2(tmp_path, rows=rows)
    with pytest.raises(DataError) as error:
        read_site("casme2", tmp_path)
    assert_user_message(error, "CASME2-coding-20190701.xlsx", "row 3", "'Subject'", "holds no number")
