"""Built-in demo data: deterministic synthetic phantoms in the raw layouts of the real datasets.

``organmtl demo-data OUT`` writes (``FAMILIES``):

===============  ==================================================  =========================
folder          what                                                 layout of the real data
===============  ==================================================  =========================
han_pddca       head-and-neck CT, 9 OARs incl. chiasm/optic nerves   PDDCA 1.4.1 (NRRD, .fcsv)
                (``han_source="atlas"``: real contours, rendered CT;
                docs/han_atlas.md)
spine           2D sagittal MR-like / axial CT-like spine slices     generic ``volumes`` folder
abdomen_mr      two-channel fat/water MR, 6 organs, hip joints       landmark-input thesis
visceral_ct     CT with kidneys and renal-pelvis landmarks           VISCERAL Anatomy3
multimodal      brain MR / breast MR / cardiac CTA tasks             generic ``volumes`` folders
dicom_rt        RT planning CT (DICOM) + RTSTRUCT contours, a hole   DICOM-RT (CT series + RS)
chaos           CT liver, MR T1DUAL/T2SPIR abdomen, shuffled DICOM   CHAOS (DICOM + PNG masks)
abdomen_partial abdomen phantoms, two annotators + full truth        ``volumes`` folders (partial labels)
===============  ==================================================  =========================
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from organmtl.demo_data.abdomen import write_abdomen
from organmtl.demo_data.chaos import write_chaos
from organmtl.demo_data.dicom_rt import write_dicom_rt
from organmtl.demo_data.han import write_han
from organmtl.demo_data.multimodal import write_multimodal
from organmtl.demo_data.partial import write_abdomen_partial
from organmtl.demo_data.spine import write_spine
from organmtl.demo_data.visceral import write_visceral

FAMILIES = {
    "han_pddca": (write_han, 10),
    "spine": (write_spine, 24),
    "abdomen_mr": (write_abdomen, 6),
    "visceral_ct": (write_visceral, 6),
    "multimodal": (write_multimodal, 6),
    "dicom_rt": (write_dicom_rt, 4),
    "chaos": (write_chaos, 4),
    "abdomen_partial": (write_abdomen_partial, 4),
}


#: what the ``han_pddca`` family is made of: ``phantom`` (:mod:`organmtl.demo_data.han`, the default) or
#: ``atlas`` (real expert contours with a rendered CT, :mod:`organmtl.demo_data.han_atlas`)
HAN_SOURCES = ("phantom", "atlas")


def write_demo_data(out: Path, seed: int = 0, families=None, n_cases: int | None = None,
                    overwrite: bool = False, han_size: str = "demo", han_source: str = "phantom") -> dict:
    """Write the demo phantoms under ``out`` (built in a temporary folder, moved into place).
    ``han_size``: volume size of the head-and-neck phantoms (``han.SIZES``: ``demo``, ``pddca``).
    ``han_source``: :data:`HAN_SOURCES`; ``atlas`` writes ``han_pddca/train``, ``test`` and
    ``reference`` (all scans unless ``n_cases`` limits each split) at its own grid (``han_size`` demo only).

    Returns the index ``{family: case ids}`` that is also written to ``out/index.json``.
    """
    out = Path(out)
    families = list(families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown demo family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    if han_source not in HAN_SOURCES:
        raise ValueError(f"unknown head-and-neck source {han_source!r}; choose from {', '.join(HAN_SOURCES)}")
    if han_source == "atlas" and han_size != "demo":
        raise ValueError("the atlas head-and-neck data has one grid (2 x 2 x 2.5 mm); --size applies to the phantom")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty (use --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        index = {"seed": seed, "families": {}}
        for family in families:
            writer, default_n = FAMILIES[family]
            if family == "han_pddca" and han_source == "atlas":
                from organmtl.demo_data.han_atlas import write_han_atlas

                index["families"][family] = write_han_atlas(tmp / family, n_cases, seed)
                index["han_source"] = han_source
                continue
            extra = {"size": han_size} if family == "han_pddca" else {}
            index["families"][family] = writer(tmp / family, n_cases or default_n, seed, **extra)
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index
