"""The licence, changelog and citation files a user looks for: present, and agreeing with pyproject.toml."""
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def test_license_is_the_apache_2_text_that_pyproject_declares():
    text = (ROOT / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "9. Accepting Warranty or Additional Liability." in text and "END OF TERMS AND CONDITIONS" in text


def test_changelog_has_the_current_version_by_area():
    text = (ROOT / "CHANGELOG.md").read_text()
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version = "))
    assert f"## {version}" in text and text.count("\n### ") >= 4


def test_citation_cff_cites_the_software_and_the_five_papers():
    """CFF 1.2.0 (validated with cffconvert --validate when written; that package is not a dependency)."""
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "Apache-2.0"
    assert cff["version"] in (ROOT / "pyproject.toml").read_text()
    refs = cff["references"]
    assert len(refs) == 5 and all(r["title"] and r["authors"] and r["type"] for r in refs)
    titles = " | ".join(r["title"] for r in refs)
    for name in ("FocusNetv2", "Multi-task Medical Image Segmentation in Multiple Modalities", "HMR-Net",
                 "Landmarks as inputs", "anatomical landmark prediction"):
        assert name in titles, name
    moeskops = next(r for r in refs if "Multiple Modalities" in r["title"])
    assert moeskops["authors"][0] == {"given-names": "Pim", "family-names": "Moeskops"} and moeskops["year"] == 2016
