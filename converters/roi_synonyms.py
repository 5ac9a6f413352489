"""ROI name synonyms for common organs at risk, keyed by their AAPM TG-263 names.

Centres name the same structure differently ("Lt Lung", "Lung_L", "LUNG LT", "Left Lung"). This
table turns each TG-263 name (AAPM Report 263, "Standardizing Nomenclatures in Radiation
Oncology", primary names for organs at risk) into case-insensitive regular expressions that fully
match the usual variants; it is used from ``--roi-map`` (see docs/converters.md, "ROI synonyms"):

- ``--roi-map tg263``: every structure of the table found in at least one case becomes a label;
- in a map file, ``{"Lung_L": "@tg263"}`` (or ``"@tg263"`` inside a list of regexes) takes the
  table's patterns for that label.

Rules: words may be separated by spaces, ``_``, ``-`` or ``.`` (or nothing); a paired organ
carries its side before or after the name as ``L``/``Lt``/``Left``/``Lft`` or
``R``/``Rt``/``Right``; a paired organ without side ("Parotid") matches nothing (ambiguous).
"""
from __future__ import annotations

import re

SEP = r"[\s_.\-]*"
SIDES = {"L": ("l", "lt", "left", "lft"), "R": ("r", "rt", "right")}

# TG-263 name -> (names of the structure, paired). Names are lower-case; a space stands for SEP.
STRUCTURES: dict[str, tuple[tuple[str, ...], bool]] = {
    "External": (("external", "body", "outline", "skin", "patient", "ext"), False),
    "Brain": (("brain",), False),
    "Brainstem": (("brainstem", "brain stem"), False),
    "SpinalCord": (("spinal cord", "cord", "spinalcord", "myelon"), False),
    "OpticChiasm": (("optic chiasm", "chiasm", "chiasma"), False),
    "OpticNrv": (("optic nerve", "optic nrv", "opticnerve", "optic n"), True),
    "Eye": (("eye", "globe", "bulbus"), True),
    "Lens": (("lens",), True),
    "Cochlea": (("cochlea",), True),
    "Pituitary": (("pituitary", "hypophysis"), False),
    "Parotid": (("parotid", "parotid gland", "glnd parotid"), True),
    "Glnd_Submand": (("submandibular", "submandibular gland", "submand", "glnd submand", "smg"), True),
    "Bone_Mandible": (("mandible", "bone mandible", "jaw"), False),
    "Cavity_Oral": (("oral cavity", "cavity oral", "mouth"), False),
    "Larynx": (("larynx",), False),
    "Glnd_Thyroid": (("thyroid", "thyroid gland", "glnd thyroid"), False),
    "BrachialPlex": (("brachial plexus", "brachialplex", "brachial plex", "bp"), True),
    "Esophagus": (("esophagus", "oesophagus", "esoph", "oesoph"), False),
    "Trachea": (("trachea",), False),
    "Lung": (("lung",), True),
    "Lungs": (("lungs", "lung total", "total lung", "lungs total", "both lungs", "lung both", "lungs both",
               "lung bilat", "bilat lung", "lungs combined", "lung combined"), False),
    "Heart": (("heart", "cardiac"), False),
    "Breast": (("breast",), True),
    "Liver": (("liver",), False),
    "Spleen": (("spleen",), False),
    "Stomach": (("stomach",), False),
    "Pancreas": (("pancreas",), False),
    "Duodenum": (("duodenum",), False),
    "Bowel_Small": (("small bowel", "bowel small", "small intestine"), False),
    "Colon": (("colon", "large bowel", "bowel large"), False),
    "Kidney": (("kidney", "ren"), True),
    "Bladder": (("bladder", "urinary bladder"), False),
    "Rectum": (("rectum",), False),
    "Prostate": (("prostate",), False),
    "Femur_Head": (("femoral head", "femur head", "head of femur", "femur", "hof"), True),
}


def _words(name: str) -> str:
    return SEP.join(re.escape(w) for w in name.split())


def _patterns(names: tuple[str, ...], side: str | None) -> list[str]:
    words = "|".join(_words(n) for n in names)
    if side is None:
        return [f"(?:{words})"]
    sides = "|".join(SIDES[side])
    return [f"(?:{sides}){SEP}(?:{words})", f"(?:{words}){SEP}(?:{sides})"]


def _table() -> dict[str, list[str]]:
    out = {}
    for name, (names, paired) in STRUCTURES.items():
        if paired:
            out[f"{name}_L"] = _patterns(names, "L")
            out[f"{name}_R"] = _patterns(names, "R")
        else:
            out[name] = _patterns(names, None)
    return out


SYNONYMS: dict[str, list[str]] = _table()
"""TG-263 label -> regexes (case-insensitive full match on ROIName), in table order."""


def synonym_label(roi_name: str) -> str | None:
    """The TG-263 label whose synonyms fully match ``roi_name`` (first in table order), or None."""
    for label, patterns in SYNONYMS.items():
        if any(re.fullmatch(p, roi_name.strip(), flags=re.IGNORECASE) for p in patterns):
            return label
    return None
