"""``organmtl`` command line. Exit codes: 0 success, 1 failure, 2 bad input or usage."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or input: printed as one line, exit code 2."""


# ---------------------------------------------------------------- list / doctor

def cmd_list(args) -> int:
    from organmtl.plugins.registry import discover_plugins

    plugins = discover_plugins()
    failed = False
    for p in plugins.values():
        origin = f" [{p.distribution}]" if p.distribution and p.distribution != "organmtl" else ""
        print(f"{p.name}{origin}: {p.description}")
        if p.has_trainers:
            print(f"  nnU-Net trainers : {', '.join(p.trainer_names)}")
        if p.detectron_configs:
            print(f"  Detectron2 configs: {', '.join(p.config_paths() if args.paths else p.detectron_configs)}")
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


def cmd_doctor(args) -> int:
    from organmtl.doctor import run_doctor

    return run_doctor(verbose=args.verbose)


def cmd_install_hooks(args) -> int:
    from organmtl.env import install_startup_hook

    print(f"start-up hook written: {install_startup_hook()}")
    return EXIT_OK


# ---------------------------------------------------------------- data

def cmd_demo_data(args) -> int:
    from organmtl.demo_data import write_demo_data

    try:
        index = write_demo_data(args.out, seed=args.seed, families=args.families, n_cases=args.n_cases,
                                overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        raise UsageError(str(e)) from None
    for family, ids in index["families"].items():
        n = sum(len(v) for v in ids.values()) if isinstance(ids, dict) else len(ids)
        print(f"{family}: {n} cases -> {args.out / family}")
    return EXIT_OK


def cmd_convert(args) -> int:
    from organmtl.converters.command import convert_with_status

    return convert_with_status(args.converter, args)[1]     # 1: some case failed (listed on stderr)


def cmd_plan_tiny(args) -> int:
    from organmtl.nnunet_plans import plan_tiny

    path = plan_tiny(args.d, configurations=args.c, num_processes=args.np, max_features=args.max_features,
                     batch_size=args.batch_size, verify=not args.no_verify)
    print(f"tiny configurations {', '.join(args.c)} added to {path} and preprocessed")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from organmtl.evaluation.evaluate import run_evaluation
    from organmtl.evaluation.results import markdown_table
    from organmtl.evaluation.volumes import EvaluationError

    try:
        summary, paths = run_evaluation(args.pred, args.gt, out_dir=args.output, dataset_json=args.dataset_json,
                                        tolerance_mm=args.tolerance_mm, score_threshold=args.score_threshold,
                                        small_organs=args.small_organs, landmarks_pred=args.landmarks_pred,
                                        landmarks_gt=args.landmarks_gt)
    except EvaluationError as e:
        raise UsageError(str(e)) from None
    print(markdown_table(summary))
    for what, path in paths.items():
        print(f"{what}: {path}")
    return EXIT_OK


def cmd_report(args) -> int:
    from organmtl.evaluation.report import ReportError, write_report

    try:
        page = write_report(args.run_dir, out_dir=args.output, max_cases=args.max_cases, coco_gt=args.coco_gt,
                            coco_images=args.coco_images)
    except ReportError as e:
        raise UsageError(str(e)) from None
    print(f"report: {page}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from organmtl.demo import run_demo

    return run_demo(args.out, epochs=args.epochs, iterations=args.iterations, overwrite=args.overwrite,
                    detectron_iterations=args.detectron_iterations, only=args.only)


def cmd_multitask_experiments(args) -> int:
    from organmtl.nnunet_trainers.multitask.experiments import ExperimentError, run_experiments

    try:
        result = run_experiments(args.dataset_id, args.out, sources=args.sources, name=args.name, tasks=args.tasks,
                                 trainer=args.trainer, configuration=args.c, n_test=args.test_per_task,
                                 n_val=args.val_per_task, epochs=args.epochs, iterations=args.iterations,
                                 val_iterations=args.val_iterations, device=args.device)
    except ExperimentError as e:
        raise UsageError(str(e)) from None
    print(result["markdown"].read_text(), end="")
    print(f"table: {result['markdown']} and {result['csv']}")
    return EXIT_OK


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from organmtl.converters import add_common_arguments
    from organmtl.demo_data import FAMILIES
    from organmtl.plugins.registry import all_converters, load_reference

    parser = argparse.ArgumentParser(prog="organmtl", description=__doc__.split("\n")[0] + " "
                                     "Multi-task organ segmentation for nnU-Net v2 and Detectron2.")
    parser.add_argument("--version", action="version", version=f"organmtl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="installed plugins (methods) and what each provides")
    p.add_argument("--check", action="store_true", help="resolve every trainer/config/converter (exit 1 on a problem)")
    p.add_argument("--paths", action="store_true", help="print config files as absolute paths")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("doctor", help="versions, paths and whether nnU-Net can see our trainers")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("install-hooks", help="(re)write the start-up hook that sets nnUNet_extTrainer")
    p.set_defaults(func=cmd_install_hooks)

    p = sub.add_parser("demo-data", help="write the synthetic demo phantoms in the raw dataset layouts")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), help="subset of families (default all)")
    p.add_argument("--n-cases", type=int, default=None, help="cases per family (default: per family)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("convert", help="convert a dataset to nnU-Net raw format or COCO")
    sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, ref in sorted(all_converters().items()):
        converter = load_reference(ref)
        sp = sources.add_parser(name, help=converter.help, description=converter.help)
        add_common_arguments(sp, converter)
        sp.set_defaults(func=cmd_convert, converter=converter)

    p = sub.add_parser("plan-tiny", help="nnU-Net fingerprint + plans + tiny CPU configurations + preprocessing")
    p.add_argument("-d", type=int, required=True, help="dataset id")
    p.add_argument("-c", nargs="+", default=["3d_tiny"], choices=["3d_tiny", "2d_tiny"])
    p.add_argument("-np", type=int, default=2, help="processes")
    p.add_argument("--max-features", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--no-verify", action="store_true", help="skip nnU-Net's dataset integrity check")
    p.set_defaults(func=cmd_plan_tiny)

    p = sub.add_parser("evaluate", help="per-structure Dice/IoU/HD/HD95/surface Dice in mm, detection mAP, landmark "
                       "errors: nnU-Net prediction folder or COCO results JSON (docs/evaluation.md)")
    p.add_argument("pred", type=Path, help="nnU-Net prediction folder, or COCO instance results .json")
    p.add_argument("gt", type=Path, help="reference folder (e.g. labelsTs), or COCO ground-truth .json")
    p.add_argument("--dataset-json", type=Path, default=None,
                   help="nnU-Net dataset.json (default PRED/dataset.json, then GT/../dataset.json)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output folder for per_case.csv, summary.json, summary.md (default PRED, or "
                   "RESULTS_evaluation/ beside a COCO results file)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="COCO: minimum instance score for the masks")
    p.add_argument("--small-organs", nargs="+", default=None,
                   help="structures averaged as small organs (default: dataset.json organmtl_small_organs)")
    p.add_argument("--landmarks-pred", type=Path, default=None, help="predicted landmarks/<case>.json folder")
    p.add_argument("--landmarks-gt", type=Path, default=None, help="reference landmarks/<case>.json folder")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="overlays, learning curves and a one-page summary of a run folder "
                       "(nnU-Net fold/results folder, Detectron2 OUTPUT_DIR, organmtl demo output)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("-o", "--output", type=Path, default=None, help="report folder (default RUN_DIR/report)")
    p.add_argument("--max-cases", type=int, default=3, help="cases with overlays per prediction folder")
    p.add_argument("--coco-gt", type=Path, default=None, help="Detectron2: COCO ground truth for overlays")
    p.add_argument("--coco-images", type=Path, default=None, help="Detectron2: image folder of --coco-gt")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="end to end on the demo data: generate, convert, train, predict, evaluate")
    p.add_argument("--out", type=Path, default=Path("demo_output"))
    p.add_argument("--epochs", type=int, default=None, help="nnU-Net epochs (default: demo budget)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch")
    p.add_argument("--detectron-iterations", type=int, default=None, help="Detectron2 iterations (default: demo budget)")
    p.add_argument("--only", nargs="+", choices=[*demo_studies(), "detectron"], default=None,
                   help="run only these parts (default: all)")
    p.add_argument("--overwrite", action="store_true", help="start again from scratch")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("multitask-experiments", help="Moeskops et al.'s task-subset experiments: train every "
                       "non-empty subset of a merged dataset's tasks, table of Dice and cross-task confusion")
    p.add_argument("sources", type=Path, nargs="*", help="nnU-Net raw datasets to merge first (none: --dataset-id "
                   "is an existing merged, planned dataset)")
    p.add_argument("--dataset-id", type=int, required=True, help="merged dataset id (created when SOURCES are given)")
    p.add_argument("--name", default="MultiTask", help="merged dataset name (with SOURCES)")
    p.add_argument("--out", type=Path, required=True, help="folder for predictions, logs and the table")
    p.add_argument("--tasks", nargs="+", default=None, help="subset of the dataset's tasks (default all)")
    p.add_argument("--trainer", default="nnUNetTrainerOMTLTriplanar_Tiny")
    p.add_argument("-c", default="3d_tiny", help="nnU-Net configuration")
    p.add_argument("--test-per-task", type=int, default=2, help="held-out test cases per task")
    p.add_argument("--val-per-task", type=int, default=1, help="validation cases per task (thresholds)")
    p.add_argument("--epochs", type=int, default=None, help="ORGANMTL_EPOCHS of _Tiny trainers")
    p.add_argument("--iterations", type=int, default=None, help="ORGANMTL_ITERS_PER_EPOCH of _Tiny trainers")
    p.add_argument("--val-iterations", type=int, default=None, help="ORGANMTL_VAL_ITERS of _Tiny trainers")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.set_defaults(func=cmd_multitask_experiments)
    return parser


def demo_studies() -> list[str]:
    from organmtl.demo import STUDIES

    return [s.key for s in STUDIES]


def _version() -> str:
    from organmtl import __version__

    return __version__


def main(argv=None) -> int:
    from organmtl.converters.common import ConversionError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConversionError) as e:
        print(f"organmtl {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
