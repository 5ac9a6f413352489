"""settings.stored_plans_entry / set_plans_value: where a trainer finds and writes its stored plans entries."""
import json
from types import SimpleNamespace

from organmtl.nnunet_trainers.settings import set_plans_value, stored_plans_entry


def _trainer(tmp_path, config: dict, init_plans: dict | None = None, folder=True):
    plans = {"configurations": {"3d_fullres": config}}
    return SimpleNamespace(configuration_manager=SimpleNamespace(configuration=config),
                           plans_manager=SimpleNamespace(plans=plans), configuration_name="3d_fullres",
                           my_init_kwargs={"plans": init_plans if init_plans is not None else plans},
                           output_folder_base=str(tmp_path) if folder else None)


def test_entry_from_the_plans_then_from_the_model_folder(tmp_path):
    t = _trainer(tmp_path, {"organmtl_x": {"a": 1}})
    assert stored_plans_entry(t, "organmtl_x") == ({"a": 1}, "the plans' configuration entry")
    t = _trainer(tmp_path, {})
    assert stored_plans_entry(t, "organmtl_x") == (None, "")
    (tmp_path / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {"organmtl_x": {"a": 2}}}}))
    assert stored_plans_entry(t, "organmtl_x") == ({"a": 2}, str(tmp_path / "plans.json"))
    assert stored_plans_entry(_trainer(tmp_path, {}, folder=False), "organmtl_x") == (None, "")


def test_set_writes_every_copy_nnunet_reads_each_its_own(tmp_path):
    init = {"configurations": {"3d_fullres": {}}}
    t = _trainer(tmp_path, {}, init_plans=init)
    value = {"patch": [1, 2]}
    set_plans_value(t, "organmtl_x", value)
    copies = [t.configuration_manager.configuration["organmtl_x"],
              t.plans_manager.plans["configurations"]["3d_fullres"]["organmtl_x"],
              init["configurations"]["3d_fullres"]["organmtl_x"]]
    assert all(c == value for c in copies)
    value["patch"].append(3)
    assert all(c == {"patch": [1, 2]} for c in copies)          # copies, not the caller's object
