"""Export a trained pipeline to a Hub-ready folder with a model card, and optionally push it (or a cached dataset).

    diffusers-speedup export runs/uvit/checkpoint-40000 --output_dir exports/uvit-s2 --model_name uvit-s2-digits \\
        --fid 12.4 --fid_num_samples 10000 [--push_to_hub --hub_model_id me/uvit-s2-digits [--private]]
    diffusers-speedup export --push_to_hub --dataset_folder cache/imagenet256 --hub_dataset_id me/imagenet256-latents

The input is a pipeline folder (with model_index.json), a checkpoint folder (the pipeline in a subfolder when it holds
one, an EMA pipeline preferred, else exported from its pipeline_record.json and weights, without the training data),
or a run folder whose `latest` file names the checkpoint. Nothing is uploaded without --push_to_hub, and repositories
are created public unless --private is given (a recipe's hub.private). A --dataset_folder without --push_to_hub, the
old form, is still pushed for one release, with a warning. The token comes from HF_TOKEN or `hf auth login`; it is
never accepted on the command line, so it cannot end up in shell history or logs.
"""

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import yaml

from diffusers_speedup.commands.common import load_pipeline, warn_deprecated
from diffusers_speedup.distributed import require_single_process
from diffusers_speedup.errors import one_line_errors
from diffusers_speedup.hub import export_pipeline, push_dataset_folder, push_folder_to_hub
from diffusers_speedup.hub.export import card_info_for_reexport
from diffusers_speedup.hub.pipeline_record import resolve_export_input
from diffusers_speedup.hub.training_config import check_training_config

logger = logging.getLogger("export")
CONFIG_NAMES = ("training_config.yaml", "config.yaml")
GRID_NAMES = ("samples.png", "sample_grid.png", "samples.jpg")


def find_first(folders, names):
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def read_training_config(path: Path) -> dict:
    """The training config at `path` as a plain mapping; a file that is not one is a one-line error naming it."""
    if path.is_dir():
        raise IsADirectoryError(f"training config {path} is a directory, not a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"training config {path} is not a YAML text file (it is not UTF-8 text)") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(
            f"training config {path} is not valid YAML{line}: {getattr(error, 'problem', error)}"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"training config {path} holds a {type(config).__name__}, not a mapping of sections")
    return config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="diffusers-speedup export", description=__doc__.split("\n")[0])
    parser.add_argument("input", nargs="?", help="pipeline, checkpoint or run folder")
    parser.add_argument("--output_dir", help="Hub-ready folder to write (replaced if it exists)")
    parser.add_argument("--config", help="training config YAML (default: found next to the pipeline)")
    parser.add_argument("--sample_grid", help="image of samples to show in the card (default: found next to it)")
    parser.add_argument("--model_name", default=None, help="card title and model-index name (default: folder name)")
    parser.add_argument("--fid", type=float, default=None, help="FID to report in the card's model-index")
    parser.add_argument("--fid_num_samples", type=int, default=None, help="number of samples the FID used")
    parser.add_argument("--fid_settings", default=None, help="how the FID samples were drawn (free text)")
    parser.add_argument(
        "--fid_json", default=None, help="the JSON that `evaluate` wrote; fills --fid and --fid_num_samples"
    )
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id trained on (repeatable)")
    parser.add_argument("--dataset_name", default=None, help="human name of the data, e.g. 'ImageNet 256x256'")
    parser.add_argument(
        "--base_model", default=None, help="Hub id the run started from (default: the recipe's model.pretrained)"
    )
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--hardware", default=None, help="e.g. '8x H100'")
    parser.add_argument("--training_time", default=None, help="e.g. '14 h'")
    parser.add_argument("--batch_size", type=int, default=None, help="global batch size (for the card)")
    parser.add_argument(
        "--push_to_hub",
        action="store_true",
        help="push the exported folder to --hub_model_id and the --dataset_folder to --hub_dataset_id",
    )
    parser.add_argument("--hub_model_id", default=None, help="'user/name' of the model repository")
    parser.add_argument("--private", action="store_true", help="create the repositories as private (default: public)")
    parser.add_argument("--commit_message", default="Upload pipeline")
    parser.add_argument("--dataset_folder", default=None, help="cached-latent dataset folder to push")
    parser.add_argument("--hub_dataset_id", default=None, help="'user/name' of the dataset repository")
    args = parser.parse_args(argv)
    if args.input is None and args.dataset_folder is None:
        parser.error("give a pipeline/checkpoint folder to export, or --dataset_folder to push")
    if args.input is not None and args.output_dir is None:
        parser.error("--output_dir is required to export a pipeline")
    if args.push_to_hub and args.input is not None and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id user/name for the exported pipeline")
    if args.dataset_folder and not args.hub_dataset_id:
        parser.error("--dataset_folder needs --hub_dataset_id user/name")
    if args.dataset_folder and not args.push_to_hub:
        # The old form pushed a --dataset_folder without the flag; it still does, for one release.
        warn_deprecated(
            "--dataset_folder without --push_to_hub",
            f"use --push_to_hub --dataset_folder {args.dataset_folder} --hub_dataset_id {args.hub_dataset_id}",
        )
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    with one_line_errors():
        require_single_process("diffusers-speedup export")
        # A checkpoint without a saved pipeline is exported from its pipeline record into a staging folder first.
        parent = Path(args.output_dir).parent if args.output_dir else Path(".")
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=parent) as staging:
            return _export_and_push(args, Path(staging) / "from-checkpoint")


def _export_and_push(args, staging: Path) -> int:
    if args.input is not None:
        # A --config that cannot be read stops the export before a checkpoint's weights are exported.
        config_path = Path(args.config) if args.config else None
        config = read_training_config(config_path) if config_path else None
        pipeline_dir = resolve_export_input(Path(args.input), staging)
        search = [pipeline_dir, pipeline_dir.parent, pipeline_dir.parent.parent]
        if config_path is None:
            config_path = find_first(search, CONFIG_NAMES)
            config = read_training_config(config_path) if config_path else None
        if config is not None:
            # The config is written next to the weights and the card is built from it: it must be this network's.
            config_name = f"--config {config_path}" if args.config else str(config_path)
            check_training_config(config, pipeline_dir, config_name, pipeline_name=args.input)
        grid = Path(args.sample_grid) if args.sample_grid else find_first(search, GRID_NAMES)
        if args.fid_json:
            evaluation = json.loads(Path(args.fid_json).read_text())
            args.fid = evaluation["fid"] if args.fid is None else args.fid
            args.fid_num_samples = args.fid_num_samples or evaluation.get("num_samples")
            args.fid_settings = args.fid_settings or f"against {evaluation.get('reference')}"
        info = card_info_for_reexport(
            pipeline_dir,
            model_name=args.model_name or Path(args.output_dir).name,
            repo_id=args.hub_model_id,
            license=args.license,
            datasets=args.dataset,
            dataset_name=args.dataset_name,
            base_model=args.base_model,
            fid=args.fid,
            fid_num_samples=args.fid_num_samples,
            fid_settings=args.fid_settings,
            batch_size=args.batch_size,
            hardware=args.hardware,
            training_time=args.training_time,
        )
        logger.info("Exporting %s (config: %s, samples: %s)", pipeline_dir, config_path, grid)
        out = export_pipeline(
            load_pipeline(pipeline_dir), args.output_dir, training_config=config, sample_grid=grid, card_info=info
        )
        print(f"Exported to {out}")
        if args.push_to_hub:
            url = push_folder_to_hub(out, args.hub_model_id, private=args.private, commit_message=args.commit_message)
            print(f"Pushed: {url}")
    if args.dataset_folder:
        url = push_dataset_folder(args.dataset_folder, args.hub_dataset_id, private=args.private)
        print(f"Pushed dataset: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
