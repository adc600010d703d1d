"""Label spaces, the MEGC2019 subset list and ``load_site`` (datasets.md, "Protocols")."""

from __future__ import annotations

from pathlib import Path

import pytest
from handmade import CASME2_SAMPLES, assert_user_message, build_casme2, build_casme3, build_samm, build_smic, write_csv

from partitions.errors import DataError
from partitions.labels import LABEL_SPACES, LabelledSite, label_space, load_site


def classes_of(site: LabelledSite) -> dict[str, str]:
    """``subject/clip_id`` -> class name, as the targets say."""
    return {f"{s.subject}/{s.clip_id}": site.space.classes[t] for s, t in zip(site.samples, site.targets, strict=True)}


def dropped(site: LabelledSite) -> set[str]:
    """Entries skipped because the label space drops their emotion."""
    return {s.entry.split(" (")[0] for s in site.skipped if "is not a class of --labels" in s.reason}


@pytest.fixture
def casme2_root(tmp_path: Path) -> Path:
    return build_casme2(tmp_path / "casme2")


def test_every_space_is_listed() -> None:
    assert set(LABEL_SPACES) == {"composite3", "casme2-5", "samm-5", "smic-3", "casme3-7", "native"}


def test_native_classes_are_the_sorted_vocabulary(casme2_root: Path) -> None:
    site = load_site("casme2", casme2_root)
    assert site.space.name == "native"
    assert site.space.classes == ("disgust", "fear", "happiness", "others", "repression", "sadness", "surprise")
    assert len(site.samples) == len(site.targets) == CASME2_SAMPLES
    assert classes_of(site)["sub01/EP02_01f"] == "happiness"
    assert classes_of(site)["sub02/EP01_01"] == "others"
    assert len(site.skipped) == 2  # only the reader's skips: native drops nothing


def test_composite3_on_casme2(casme2_root: Path) -> None:
    site = load_site("casme2", casme2_root, labels="composite3")
    assert site.space.classes == ("negative", "positive", "surprise")
    assert classes_of(site) == {
        "sub01/EP02_01f": "positive",
        "sub01/EP03_02": "negative",  # disgust
        "sub03/EP07_01": "negative",  # repression
        "sub04/EP08_01": "surprise",
        "sub04/EP09_01": "negative",  # fear
    }
    assert dropped(site) == {"sub02/EP01_01"}  # others


def test_casme2_5_drops_fear_and_sadness(casme2_root: Path) -> None:
    site = load_site("casme2", casme2_root, labels="casme2-5")
    assert site.space.classes == ("happiness", "disgust", "repression", "surprise", "others")
    assert dropped(site) == {"sub04/EP09_01"}
    assert classes_of(site)["sub02/EP01_01"] == "others"
    assert site.targets[[s.clip_id for s in site.samples].index("EP03_02")] == 1  # disgust


def test_samm_spaces(tmp_path: Path) -> None:
    root = build_samm(tmp_path)
    five = load_site("samm", root, labels="samm-5")
    assert five.space.classes == ("anger", "contempt", "happiness", "surprise", "other")
    assert dropped(five) == {"016/016_7_4"}  # sadness
    assert classes_of(five)["007/007_3_1"] == "other"
    composite = load_site("samm", root, labels="composite3")
    assert classes_of(composite) == {
        "006/006_1_2": "negative",  # anger
        "006/006_1_3": "positive",
        "011/011_2_1": "negative",  # contempt
        "016/016_7_1": "surprise",
        "016/016_7_4": "negative",  # sadness
    }
    assert dropped(composite) == {"007/007_3_1"}  # other


def test_smic_spaces_map_directly(tmp_path: Path) -> None:
    root = build_smic(tmp_path)
    for space in ("smic-3", "composite3", "native"):
        site = load_site("smic", root, labels=space)
        assert site.space.classes == ("negative", "positive", "surprise")
        assert classes_of(site)["s2/s2_sur_01"] == "surprise"
        assert len(site.samples) == 5 and not dropped(site)
    assert len(load_site("smic-nir", root, labels="smic-3").samples) == 2


def test_casme3_spaces(tmp_path: Path) -> None:
    root = build_casme3(tmp_path)
    seven = load_site("casme3", root, labels="casme3-7")
    assert seven.space.classes == ("happy", "disgust", "fear", "anger", "sad", "surprise", "others")
    assert classes_of(seven) == {
        "spNO.1/a_355": "happy",
        "spNO.1/a_370": "others",
        "spNO.2/b_100": "surprise",
        "spNO.3/d_200": "sad",
        "spNO.1/b_20": "fear",
    }
    composite = load_site("casme3", root, labels="composite3")
    assert classes_of(composite) == {
        "spNO.1/a_355": "positive",
        "spNO.2/b_100": "surprise",
        "spNO.3/d_200": "negative",  # sad
        "spNO.1/b_20": "negative",  # fear
    }
    assert dropped(composite) == {"spNO.1/a_370"}


@pytest.mark.parametrize(
    ("dataset", "space", "applies"),
    [
        ("casme2", "samm-5", "composite3, casme2-5, native"),
        ("samm", "casme2-5", "composite3, samm-5, native"),
        ("smic", "casme3-7", "composite3, smic-3, native"),
        ("casme3", "smic-3", "composite3, casme3-7, native"),
    ],
)
def test_space_that_does_not_apply(tmp_path: Path, dataset: str, space: str, applies: str) -> None:
    with pytest.raises(DataError) as error:
        label_space(space, dataset)
    assert_user_message(error, f"--labels {space}", f"--dataset {dataset}", applies)


def test_space_is_checked_before_reading_the_tree(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_site("samm", tmp_path / "missing", labels="casme2-5")
    assert_user_message(error, "--labels casme2-5", "SAMM")


def test_unknown_space(casme2_root: Path) -> None:
    with pytest.raises(DataError) as error:
        load_site("casme2", casme2_root, labels="emotions")
    assert_user_message(error, "'emotions'", "composite3", "native")


# ----------------------------------------------------------------------------- subset list

SUBSET_LINES = [
    "db,subject,filename,label",
    "CASME_2,sub01,EP02_01f,1",
    "casmeii,2,EP01_01,0",  # the sheet says others; the list says negative
    "casme2,sub04,EP08_01,0",  # the sheet says surprise; the list says negative
    "casme2,sub09,EP99_01,2",  # not in the site
    "SAMM,006,006_1_2,0",  # another database: ignored
    "smic,s1,s1_ne_01,0",
]


def test_subset_restricts_and_its_label_wins_under_composite3(tmp_path: Path, casme2_root: Path) -> None:
    subset = write_csv(tmp_path / "megc2019.csv", SUBSET_LINES)
    site = load_site("casme2", casme2_root, labels="composite3", subset=subset)
    assert classes_of(site) == {"sub01/EP02_01f": "positive", "sub02/EP01_01": "negative", "sub04/EP08_01": "negative"}
    missing = [s for s in site.skipped if "subset list" in s.reason]
    assert len(missing) == 1
    assert "EP99_01" in missing[0].entry and "megc2019.csv line 5" in missing[0].entry


def test_subset_only_restricts_under_other_spaces(tmp_path: Path, casme2_root: Path) -> None:
    subset = write_csv(tmp_path / "list.csv", SUBSET_LINES[1:])  # no header
    site = load_site("casme2", casme2_root, labels="casme2-5", subset=subset)
    assert classes_of(site) == {"sub01/EP02_01f": "happiness", "sub02/EP01_01": "others", "sub04/EP08_01": "surprise"}


def test_subset_for_smic_uses_aliases_and_padded_subjects(tmp_path: Path) -> None:
    root = build_smic(tmp_path / "smic")
    subset = write_csv(
        tmp_path / "list.csv", ["SMIC-HS,s01,s1_ne_01,0", "smic,02,S2_SUR_01,2", "casme2,sub01,EP02_01f,1"]
    )
    site = load_site("smic", root, labels="composite3", subset=subset)
    assert classes_of(site) == {"s1/s1_ne_01": "negative", "s2/s2_sur_01": "surprise"}
    assert not any("subset list" in s.reason for s in site.skipped)


def test_subset_without_rows_for_the_database(tmp_path: Path, casme2_root: Path) -> None:
    subset = write_csv(tmp_path / "list.csv", ["samm,006,006_1_2,0"])
    with pytest.raises(DataError) as error:
        load_site("casme2", casme2_root, subset=subset)
    assert_user_message(error, str(subset), "no row for casme2", "samm")


def test_subset_with_a_bad_label(tmp_path: Path, casme2_root: Path) -> None:
    subset = write_csv(tmp_path / "list.csv", ["db,subject,filename,label", "casme2,sub01,EP02_01f,3"])
    with pytest.raises(DataError) as error:
        load_site("casme2", casme2_root, subset=subset)
    assert_user_message(error, str(subset), "line 2", "'3'", "Fix the label")


def test_subset_with_missing_columns(tmp_path: Path, casme2_root: Path) -> None:
    subset = write_csv(tmp_path / "list.csv", ["casme2,sub01,EP02_01f,1", "casme2,sub01"])
    with pytest.raises(DataError) as error:
        load_site("casme2", casme2_root, subset=subset)
    assert_user_message(error, "line 2", "expected 4 columns")


def test_subset_file_missing(tmp_path: Path, casme2_root: Path) -> None:
    with pytest.raises(DataError) as error:
        load_site("casme2", casme2_root, subset=tmp_path / "nope.csv")
    assert_user_message(error, "nope.csv", "is not a file")


def test_first_row_with_a_bad_label_is_not_taken_for_a_header(tmp_path: Path, casme2_root: Path) -> None:
    subset = write_csv(tmp_path / "list.csv", ["casme2,sub01,EP02_01f,positive", "casme2,sub02,EP01_01,0"])
    with pytest.raises(DataError) as error:
        load_site("casme2", casme2_root, subset=subset)
    assert_user_message(error, "line 1", "'positive'")
