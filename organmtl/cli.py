"""The ``organmtl`` command line.

One ``add_<command>_parser(subparsers)`` per command, registered in :data:`COMMANDS` (the order of
``organmtl --help``); each sets ``func``, which does the work through library functions imported
when the command runs and returns the exit code: 0 success, 1 failure, 2 bad input or usage. Bad
input is the library's own exception types (:data:`USER_ERRORS`): :func:`main` prints them as one
line and exits 2, in that one place.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from organmtl.devices import DEVICE_CHOICES

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

DESCRIPTION = ("Multi-task organ segmentation methods as nnU-Net v2 trainers and Detectron2 heads: dataset "
               "converters, tiny CPU plans, landmark and centre prediction, evaluation, reports, the demo.")
EPILOG = ("Exit codes: 0 success, 1 failure, 2 bad input or usage. Training and inference of the nnU-Net "
          "trainers are nnU-Net's own commands (nnUNetv2_train -tr nnUNetTrainerOMTL..., nnUNetv2_predict); "
          "documentation: docs/index.md.")

#: exception types that mean bad input (one line naming the file and the problem, exit code 2), as
#: (module, class): checked against modules already imported, so listing one imports nothing
USER_ERRORS = (
    ("builtins", "FileExistsError"),
    ("organmtl.converters.common", "ConversionError"),
    ("organmtl.evaluation.volumes", "EvaluationError"),
    ("organmtl.evaluation.report", "ReportError"),
    ("organmtl.nnunet_trainers.landmarks.predict", "LandmarkPredictionError"),
    ("organmtl.nnunet_trainers.focusnet.centres", "CentresError"),
    ("organmtl.nnunet_trainers.focusnet.predict", "FocusNetPredictionError"),
    ("organmtl.workflows.multitask_experiments", "ExperimentError"),
    ("organmtl.workflows.demo", "DemoError"),
    ("organmtl.nnunet_plans", "PlanError"),
    ("organmtl.devices", "DeviceError"),
)


def is_user_error(error: BaseException) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return True
    return False


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def add_dataset_option(parser: argparse.ArgumentParser, help: str, type=int, **kwargs) -> None:
    """``-d`` / ``--dataset-id`` (both spellings in every command), stored as ``dataset_id``."""
    parser.add_argument("-d", "--dataset-id", dest="dataset_id", type=type, help=help, **kwargs)


# ---------------------------------------------------------------- list / doctor / install-hooks

def cmd_list(args) -> int:
    from organmtl.plugins.registry import discover_plugins

    failed = False
    for p in discover_plugins().values():
        origin = f" [{p.distribution}]" if p.distribution and p.distribution != "organmtl" else ""
        print(f"{p.name}{origin}: {p.description}")
        if p.has_trainers:
            print(f"  nnU-Net trainers : {', '.join(p.trainer_names)}")
        if p.detectron_configs:
            print(f"  Detectron2 configs: {', '.join(p.config_paths() if args.paths else p.detectron_configs)}")
            print("  (train one: python -m organmtl.detectron_heads.train_net --config-file <config as listed>)")
        if p.converters:
            print(f"  converters       : {', '.join(sorted(p.converters))}")
        if p.docs:
            print(f"  docs             : {p.docs}")
        if args.check:
            problems = p.check()
            for problem in problems:
                print(f"  PROBLEM: {problem}")
            failed |= bool(problems)
    return EXIT_FAIL if failed else EXIT_OK


def add_list_parser(sub) -> None:
    p = sub.add_parser("list", help="installed plugins (methods) and what each provides")
    p.add_argument("--check", action="store_true", help="resolve every trainer/config/converter (exit 1 on a problem)")
    p.add_argument("--paths", action="store_true", help="print config files as absolute paths")
    p.set_defaults(func=cmd_list)


def cmd_doctor(args) -> int:
    from organmtl.doctor import run_doctor

    return run_doctor(verbose=args.verbose)


def add_doctor_parser(sub) -> None:
    p = sub.add_parser("doctor", help="versions, paths and whether nnU-Net can see our trainers")
    p.add_argument("-v", "--verbose", action="store_true", help="also print where detectron2 is installed")
    p.set_defaults(func=cmd_doctor)


def cmd_install_hooks(args) -> int:
    from organmtl.env import install_startup_hook

    print(f"start-up hook written: {install_startup_hook()}")
    return EXIT_OK


def add_install_hooks_parser(sub) -> None:
    p = sub.add_parser("install-hooks", help="(re)write the start-up hook that sets nnUNet_extTrainer")
    p.set_defaults(func=cmd_install_hooks)


# ---------------------------------------------------------------- data

def cmd_demo_data(args) -> int:
    from organmtl.demo_data import write_demo_data

    if args.han_source == "atlas" and args.size != "demo":
        print("organmtl demo-data: error: --size applies to the phantom; the atlas data has one grid "
              "(2 x 2 x 2.5 mm)", file=sys.stderr)
        return EXIT_USAGE
    index = write_demo_data(args.out, seed=args.seed, families=args.families, n_cases=args.n_cases,
                            overwrite=args.overwrite, han_size=args.size, han_source=args.han_source)
    for family, ids in index["families"].items():
        n = sum(len(v) for v in ids.values()) if isinstance(ids, dict) else len(ids)
        print(f"{family}: {n} cases -> {args.out / family}")
    return EXIT_OK


def add_demo_data_parser(sub) -> None:
    from organmtl.demo_data import FAMILIES
    from organmtl.demo_data.han import SIZES as HAN_SIZES

    p = sub.add_parser("demo-data", help="write the synthetic demo phantoms in the raw dataset layouts")
    p.add_argument("out", type=Path, help="output folder (one subfolder per family)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the phantoms (default 0)")
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), help="subset of families (default all)")
    p.add_argument("--n-cases", type=positive_int, default=None, help="cases per family (default: per family)")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it is not empty")
    p.add_argument("--size", choices=list(HAN_SIZES), default="demo",
                   help="head-and-neck phantom volume: demo (32 x 80 x 80) or pddca (100 x 256 x 256, a real "
                        "PDDCA grid at 1 x 1 x 2.5 mm, for benchmarks)")
    p.add_argument("--han-source", choices=("phantom", "atlas"), default="phantom",
                   help="head-and-neck data: phantom (default) or atlas (30 real expert-contoured scans, CT "
                        "rendered from the contours, 2 x 2 x 2.5 mm; train/test/reference folders; docs/han_atlas.md)")
    p.set_defaults(func=cmd_demo_data)


def cmd_convert(args) -> int:
    from organmtl.converters.command import convert_with_status

    return convert_with_status(args.converter, args)[1]     # 1: some case failed (listed on stderr)


def add_convert_parser(sub) -> None:
    from organmtl.converters import add_common_arguments
    from organmtl.plugins.registry import all_converters, load_reference

    p = sub.add_parser("convert", help="convert a dataset to nnU-Net raw format or COCO")
    sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, ref in sorted(all_converters().items()):
        converter = load_reference(ref)
        sp = sources.add_parser(name, help=converter.help, description=converter.help)
        add_common_arguments(sp, converter)
        sp.set_defaults(func=cmd_convert, converter=converter)
    from organmtl.converters.dicom_ct import add_parser as add_dicom_ct

    add_dicom_ct(sources)     # convert dicom-ct: CT series without contours -> imagesTs (docs/predict.md)


def cmd_plan_tiny(args) -> int:
    from organmtl.nnunet_plans import plan_tiny

    path = plan_tiny(args.dataset_id, configurations=args.c, num_processes=args.np, max_features=args.max_features,
                     batch_size=args.batch_size, verify=not args.no_verify)
    print(f"tiny configurations {', '.join(args.c)} added to {path} and preprocessed")
    return EXIT_OK


def add_plan_tiny_parser(sub) -> None:
    p = sub.add_parser("plan-tiny", help="nnU-Net fingerprint + plans + tiny CPU configurations + preprocessing")
    add_dataset_option(p, "nnU-Net dataset id", required=True)
    p.add_argument("-c", nargs="+", default=["3d_tiny"], choices=["3d_tiny", "2d_tiny"],
                   help="tiny configurations to add (default 3d_tiny)")
    p.add_argument("-np", type=positive_int, default=2, help="processes (default 2)")
    p.add_argument("--max-features", type=positive_int, default=64, help="widest U-Net stage (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="batch size (default 2)")
    p.add_argument("--no-verify", action="store_true", help="skip nnU-Net's dataset integrity check")
    p.set_defaults(func=cmd_plan_tiny)


# ---------------------------------------------------------------- prediction beside nnUNetv2_predict

def add_predictor_options(p, output_help: str, trainer: str) -> None:
    """The options of ``nnUNetv2_predict`` that organmtl's own nnU-Net prediction commands take."""
    p.add_argument("-i", required=True, help="input folder (image channels _0000...)")
    p.add_argument("-o", required=True, help=output_help)
    add_dataset_option(p, "dataset name or id", type=str, required=True)
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    p.add_argument("-tr", default=trainer, help="trainer (default %(default)s)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default %(default)s)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name (default %(default)s)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step, fraction of the patch (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("-npp", type=positive_int, default=1, help="preprocessing processes (default 1)")
    p.add_argument("-nps", type=positive_int, default=1, help="export processes (default 1)")
    p.add_argument("-device", default="auto", choices=DEVICE_CHOICES, help="device (default auto: cuda if available, else cpu)")


def cmd_predict_landmarks(args) -> int:
    from organmtl.devices import resolve_device
    from organmtl.nnunet_trainers.landmarks.predict import run

    args.device = resolve_device(args.device)
    run(args)
    return EXIT_OK


def add_predict_landmarks_parser(sub) -> None:
    p = sub.add_parser("predict-landmarks", help="segmentations and landmark coordinates (<case>.json) from a "
                       "landmark auxiliary-task model; nnUNetv2_predict's options (docs/landmark_unets.md)")
    add_predictor_options(p, "output folder: <case>.nii.gz and <case>.json", "nnUNetTrainerOMTLLandmarkJoint")
    p.set_defaults(func=cmd_predict_landmarks)


def cmd_predict_focusnet(args) -> int:
    from organmtl.nnunet_trainers.focusnet.predict import run

    run(args)
    return EXIT_OK


def add_predict_focusnet_parser(sub) -> None:
    p = sub.add_parser("predict-focusnet", help="segmentations of a FocusNet model with its small organs pasted once "
                       "per case at the SOL-Net peak (the paper's rule); nnUNetv2_predict's options (docs/focusnetv2.md)")
    add_predictor_options(p, "output folder", "nnUNetTrainerOMTLFocusNetV2")
    p.add_argument("--save_probabilities", action="store_true", help="also write the class probabilities (.npz)")
    p.set_defaults(func=cmd_predict_focusnet)


def cmd_predict_centres(args) -> int:
    from organmtl.devices import resolve_device
    from organmtl.nnunet_trainers.focusnet.centres import export_folder

    for path in export_folder(args.i, args.o, args.m, args.f, args.chk, resolve_device(args.device)):
        print(path)
    return EXIT_OK


def add_predict_centres_parser(sub) -> None:
    p = sub.add_parser("predict-centres", help="FocusNet SOL-Net centres of the small organs (JSON, mm) for a "
                       "folder of images (docs/focusnetv2.md)")
    p.add_argument("-i", required=True, type=Path, help="folder of images (nnU-Net naming, <case>_0000.ext)")
    p.add_argument("-o", required=True, type=Path, help="output folder (e.g. the nnUNetv2_predict output)")
    p.add_argument("-m", required=True, type=Path, help="trained model folder (<trainer>__<plans>__<config>)")
    p.add_argument("-f", default="0", help="fold (default 0)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name (default %(default)s)")
    p.add_argument("-device", default="auto", choices=("auto", "cuda", "cpu", "mps"),
                   help="device (default auto: cuda if available, else cpu)")
    p.set_defaults(func=cmd_predict_centres)


def cmd_predict(args) -> int:
    from organmtl.workflows.predict import run_predict

    return run_predict(args)


def add_predict_parser(sub) -> None:
    from organmtl.workflows.predict import add_arguments

    p = sub.add_parser("predict", help="new patients' CT series (DICOM) -> RTSTRUCT / SEG / NIfTI with a trained "
                       "nnU-Net or Detectron2 model, in one command (docs/predict.md)")
    add_arguments(p)
    p.set_defaults(func=cmd_predict)


def add_export_parser(sub) -> None:
    from organmtl.converters.export_dicom import add_export_parser as add

    add(sub)          # organmtl export rtstruct|seg (docs/export.md)


# ---------------------------------------------------------------- evaluation and reports

def cmd_evaluate(args) -> int:
    from organmtl.evaluation.evaluate import run_evaluation
    from organmtl.evaluation.results import markdown_table

    summary, paths = run_evaluation(args.pred, args.gt, out_dir=args.output, dataset_json=args.dataset_json,
                                    tolerance_mm=args.tolerance_mm, score_threshold=args.score_threshold,
                                    small_organs=args.small_organs, landmarks_pred=args.landmarks_pred,
                                    landmarks_gt=args.landmarks_gt, centres=args.centres,
                                    annotated_only=args.annotated_only, never_together=args.never_together,
                                    reference_labels=args.reference_labels)
    print(markdown_table(summary))
    for task, block in summary.get("per_source", {}).items():
        print(f"source {task}: mean Dice {block['mean']['dice']} over its own classes")
    nt = summary.get("never_annotated_together")
    if nt:
        print(f"never annotated together: {len(nt['pairs'])} pair(s), mean Dice {nt['mean_dice']} over {nt['structures']}")
    for what, path in paths.items():
        print(f"{what}: {path}")
    return EXIT_OK


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="per-structure Dice/IoU/HD/HD95/surface Dice in mm, detection mAP, landmark "
                       "errors: nnU-Net prediction folder or COCO results JSON (docs/evaluation.md)")
    p.add_argument("pred", type=Path, help="nnU-Net prediction folder, or COCO instance results .json")
    p.add_argument("gt", type=Path, help="reference folder (e.g. labelsTs), or COCO ground-truth .json")
    p.add_argument("--dataset-json", type=Path, default=None,
                   help="nnU-Net dataset.json (default PRED/dataset.json, then GT/../dataset.json)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output folder for per_case.csv, organmtl_summary.json, summary.md (default PRED, beside "
                   "nnU-Net's own summary.json, which is left untouched; or "
                   "RESULTS_evaluation/ beside a COCO results file)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="COCO: minimum instance score for the masks")
    p.add_argument("--small-organs", nargs="+", default=None,
                   help="structures averaged as small organs (default: dataset.json organmtl_small_organs)")
    p.add_argument("--landmarks-pred", type=Path, default=None, help="predicted landmarks/<case>.json folder")
    p.add_argument("--landmarks-gt", type=Path, default=None, help="reference landmarks/<case>.json folder")
    p.add_argument("--centres", type=Path, default=None, help="FocusNet SOL-Net <case>_centres.json folder, scored "
                   "against GT's organ centres of mass (default PRED when it holds them)")
    p.add_argument("--annotated-only", action="store_true", help="partially labelled (merged) datasets: score "
                   "each case only on the classes its source annotated, and per source (docs/partial_labels.md)")
    p.add_argument("--never-together", action="store_true", help="full-truth reference: mean Dice of the classes "
                   "no training case annotated together with another (docs/partial_labels.md)")
    p.add_argument("--reference-labels", type=Path, default=None, metavar="DIR",
                   help="a second annotator's labels (PDDCA layout DIR/<case>/structures/<Name>.nrrd, or label maps "
                   "like GT): scored against GT on the same cases and printed as the 'human reference' rows")
    p.set_defaults(func=cmd_evaluate)


def cmd_report(args) -> int:
    from organmtl.evaluation.report import write_report

    page = write_report(args.run_dir, out_dir=args.output, max_cases=args.max_cases, coco_gt=args.coco_gt,
                        coco_images=args.coco_images)
    print(f"report: {page}")
    return EXIT_OK


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="overlays, learning curves and a one-page summary of a run folder "
                       "(nnU-Net fold/results folder, Detectron2 OUTPUT_DIR, organmtl demo output)")
    p.add_argument("run_dir", type=Path, help="nnU-Net fold or results folder, Detectron2 OUTPUT_DIR or demo output")
    p.add_argument("-o", "--output", type=Path, default=None, help="report folder (default RUN_DIR/report)")
    p.add_argument("--max-cases", type=positive_int, default=3, help="cases with overlays per prediction folder")
    p.add_argument("--coco-gt", type=Path, default=None, help="Detectron2: COCO ground truth for overlays")
    p.add_argument("--coco-images", type=Path, default=None, help="Detectron2: image folder of --coco-gt")
    p.set_defaults(func=cmd_report)


# ---------------------------------------------------------------- workflows

def cmd_multitask_experiments(args) -> int:
    from organmtl.workflows.multitask_experiments import run_experiments

    result = run_experiments(args.dataset_id, args.out, sources=args.sources, name=args.name, tasks=args.tasks,
                             trainer=args.trainer, configuration=args.c, n_test=args.test_per_task,
                             n_val=args.val_per_task, epochs=args.epochs, iterations=args.iterations,
                             val_iterations=args.val_iterations, device=args.device)
    print(result["markdown"].read_text(), end="")
    print(f"table: {result['markdown']} and {result['csv']}")
    return EXIT_OK


def add_multitask_experiments_parser(sub) -> None:
    p = sub.add_parser("multitask-experiments", help="Moeskops et al.'s task-subset experiments: train every "
                       "non-empty subset of a merged dataset's tasks, table of Dice and cross-task confusion")
    p.add_argument("sources", type=Path, nargs="*", help="nnU-Net raw datasets to merge first (none: -d is an "
                   "existing merged, planned dataset)")
    add_dataset_option(p, "merged dataset id (created when SOURCES are given)", required=True)
    p.add_argument("--name", default="MultiTask", help="merged dataset name (with SOURCES)")
    p.add_argument("--out", type=Path, required=True, help="folder for predictions, logs and the table")
    p.add_argument("--tasks", nargs="+", default=None, help="subset of the dataset's tasks (default all)")
    p.add_argument("--trainer", default="nnUNetTrainerOMTLTriplanar_Tiny", help="nnU-Net trainer (default %(default)s)")
    p.add_argument("-c", default="3d_tiny", help="nnU-Net configuration (default 3d_tiny)")
    p.add_argument("--test-per-task", type=int, default=2, help="test cases held out of imagesTr per task (a task with labelled imagesTs is tested on those)")
    p.add_argument("--val-per-task", type=int, default=1, help="validation cases per task (thresholds)")
    p.add_argument("--epochs", type=positive_int, default=None, help="ORGANMTL_EPOCHS of _Tiny trainers")
    p.add_argument("--iterations", type=positive_int, default=None, help="ORGANMTL_ITERS_PER_EPOCH of _Tiny trainers")
    p.add_argument("--val-iterations", type=positive_int, default=None, help="ORGANMTL_VAL_ITERS of _Tiny trainers")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="training/inference device")
    p.set_defaults(func=cmd_multitask_experiments)


def cmd_demo(args) -> int:
    from organmtl.workflows.demo import run_demo

    return run_demo(args.out, epochs=args.epochs, iterations=args.iterations,
                    detectron_iterations=args.detectron_iterations, only=args.only, jobs=args.jobs, seed=args.seed)


def add_demo_parser(sub) -> None:
    from organmtl.workflows.demo import DEFAULT_SEED, PARTS

    p = sub.add_parser("demo", help="end to end on the demo data: generate, convert, train, predict, evaluate "
                       "(an earlier demo folder is replaced)")
    p.add_argument("--out", type=Path, default=Path("demo_output"),
                   help="output folder: new, empty or an earlier demo's (default demo_output)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="nnU-Net epochs of every trainer (default: each trainer's demo budget, printed at the start)")
    p.add_argument("--iterations", type=positive_int, default=None, help="iterations per epoch of every trainer")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="trainers of a study that train at once (default: 2, or 1 on a one-core machine)")
    p.add_argument("--detectron-iterations", type=positive_int, default=None,
                   help="Detectron2 iterations (default: demo budget)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=None, help="run only these parts (default: all)")
    p.add_argument("--seed", type=_seed, default=DEFAULT_SEED,
                   help=f"every trainer's seed (ORGANMTL_SEED, Detectron2 SEED; default {DEFAULT_SEED}); "
                        "'none': unseeded, as stock nnU-Net")
    p.set_defaults(func=cmd_demo)


def _seed(text: str) -> int | None:
    if text.lower() == "none":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is >= 0 or 'none'")
    return value


def cmd_memory_check(args) -> int:
    import os
    import tempfile

    # the trainer writes its log into nnUNet_results, read when nnunetv2 is imported: a scratch folder
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="organmtl-memory-check.")
    from organmtl.memory import check_trainer, default_gpu_gib, format_report

    gpu_gb = args.gpu_gb if args.gpu_gb is not None else default_gpu_gib()[0]
    trainer, memory = check_trainer(args.dataset_id, args.configuration, args.trainer, args.fold, args.plans,
                                    args.amp, gpu_gb)
    cm = trainer.configuration_manager
    print(format_report(args.trainer, cm.patch_size, trainer.batch_size, memory, gpu_gb))
    return EXIT_OK if memory.fits(gpu_gb) else 1


def add_memory_check_parser(sub) -> None:
    p = sub.add_parser("memory-check", help="peak training memory of one step of an nnU-Net trainer, measured on "
                       "the CPU, and whether it fits a GPU (exit 1 when it does not)")
    add_dataset_option(p, "dataset name or id (preprocessed, as for nnUNetv2_train)", type=str, required=True)
    p.add_argument("-c", "--configuration", required=True, help="plans configuration, e.g. 3d_fullres")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="trainer class (default nnUNetTrainer)")
    p.add_argument("-f", "--fold", type=int, default=0, help="fold (default 0)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--gpu-gb", type=float, default=None,
                   help="GPU memory in GiB (default: the CUDA device's memory; 24 when no CUDA device is visible)")
    p.add_argument("--amp", choices=["fp16", "bf16", "none"], default="fp16",
                   help="measure under CPU autocast of this dtype, as nnU-Net trains on CUDA (default fp16)")
    p.set_defaults(func=cmd_memory_check)


# ---------------------------------------------------------------- parser and main

#: every command, in the order of ``organmtl --help``
COMMANDS = [
    add_list_parser,
    add_doctor_parser,
    add_install_hooks_parser,
    add_demo_data_parser,
    add_convert_parser,
    add_plan_tiny_parser,
    add_predict_landmarks_parser,
    add_predict_centres_parser,
    add_predict_focusnet_parser,
    add_predict_parser,
    add_export_parser,
    add_evaluate_parser,
    add_report_parser,
    add_multitask_experiments_parser,
    add_demo_parser,
    add_memory_check_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="organmtl", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"organmtl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _version() -> str:
    from organmtl import __version__

    return __version__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"organmtl {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
