"""Generate many class-conditional samples from a pipeline folder, resumably, on one or many GPUs.

    accelerate launch -m diffusers_speedup sample --pipeline path/to/pipeline --output_dir samples/run1 \\
        --num_samples 50000 --batch_size 125 --steps 50 --guidance_scale 1.5 --class_labels random --seed 0

Rerunning the same command after a crash finishes the missing shards only; the result is the same as an
uninterrupted run, whatever the number of processes. The merged `samples_{N}x{H}x{W}x{C}.npz` (ADM layout: `arr_0`
uint8 NHWC images, `arr_1` labels) goes to `diffusers-speedup evaluate` or to ADM's evaluator.

--mixed_precision takes a recipe's values, fp32, bf16 or fp16; accelerate's `no`, its old value, still means fp32 for
one release, with a warning.
"""

import argparse
import inspect
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from diffusers_speedup.commands.common import PRECISIONS, load_pipeline, renamed_values
from diffusers_speedup.distributed import check_world_size, wants_cpu_process_group
from diffusers_speedup.errors import one_line_errors
from diffusers_speedup.evaluation import generate_samples
from diffusers_speedup.pipelines.pipeline_class_conditional import _model_num_classes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="diffusers-speedup sample", description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="pipeline folder or Hub id (model_index.json layout)")
    parser.add_argument("--output_dir", required=True, help="folder for shards, the merged .npz and PNGs")
    parser.add_argument("--num_samples", type=int, default=50_000)
    parser.add_argument("--batch_size", type=int, default=64, help="samples per shard and per pipeline call")
    parser.add_argument("--steps", type=int, default=50, help="num_inference_steps")
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument(
        "--guidance_interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="apply guidance only for noise levels sigma in [LO, HI] (ClassConditionalPipeline only)",
    )
    parser.add_argument(
        "--guidance_channels",
        type=int,
        default=None,
        help="guide only the first N output channels (3 is the DiT paper's rule, behind its FIDs; default: all)",
    )
    parser.add_argument(
        "--guide",
        default=None,
        help="guide network (EDM2's guiding networks, autoguidance): a pipeline folder, whose network is taken, or a "
        "model folder; D = D_guide + w·(D_cond − D_guide)",
    )
    parser.add_argument(
        "--class_labels",
        choices=["balanced", "random", "none"],
        default=None,
        help="label scheme (default: balanced; none, for an unconditional model)",
    )
    parser.add_argument("--num_classes", type=int, default=None, help="default: read from the model's config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", action="store_true", help="also write every sample as a PNG")
    parser.add_argument(
        "--mixed_precision",
        type=renamed_values("--mixed_precision", {"no": "fp32"}),
        choices=PRECISIONS,
        default=None,
        help="fp32, or bf16/fp16 autocast (default: the launcher's, from accelerate launch --mixed_precision or "
        "accelerate config; fp32 without either)",
    )
    return parser.parse_args(argv)


def load_guide(path: str):
    """The network of a pipeline folder (its transformer or unet), or a model folder of this package or diffusers."""
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        guide_pipeline = load_pipeline(path, class_conditional=True)
        return guide_pipeline.transformer if guide_pipeline.transformer is not None else guide_pipeline.unet
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--guide: {path} is neither a pipeline folder (model_index.json) nor a model folder")
    import diffusers

    import diffusers_speedup

    class_name = json.loads(config.read_text()).get("_class_name")
    cls = getattr(diffusers_speedup, str(class_name), None) or getattr(diffusers, str(class_name), None)
    if cls is None:
        raise ValueError(f"--guide: {config} names the class {class_name!r}, which neither package defines")
    return cls.from_pretrained(folder)


def infer_num_classes(pipeline) -> int | None:
    """Number of classes of the pipeline's `transformer` or `unet`, read as the class-conditional pipeline reads it;
    None for an unconditional model."""
    for name in ("transformer", "unet"):
        model = getattr(pipeline, name, None)
        if getattr(model, "config", None) is not None and _model_num_classes(model):
            return _model_num_classes(model)
    return None


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        return sample(args)


def sample(args):
    # Several processes on a machine without a GPU form one process group only with cpu=True.
    # accelerate spells fp32 "no"; unset, it takes the launcher's setting.
    mixed_precision = "no" if args.mixed_precision == "fp32" else args.mixed_precision
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=wants_cpu_process_group())
    check_world_size(accelerator.num_processes, "diffusers-speedup sample")
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pipeline = load_pipeline(args.pipeline, class_conditional=True)
    if args.guide is not None:
        if "guide" not in getattr(pipeline, "_optional_components", ()):
            raise ValueError(f"--guide: {type(pipeline).__name__} takes no guide network")
        pipeline.register_modules(guide=load_guide(args.guide))
    pipeline = pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)

    num_classes = args.num_classes or infer_num_classes(pipeline)
    class_labels = args.class_labels or ("balanced" if num_classes else "none")
    if class_labels != "none" and num_classes is None:
        raise ValueError(
            f"could not read the number of classes from {args.pipeline}; pass --num_classes, or --class_labels none "
            "for an unconditional model"
        )
    sampling_kwargs = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
    if args.guidance_interval is not None:
        if "guidance_interval" not in inspect.signature(pipeline.__call__).parameters:
            raise ValueError(f"--guidance_interval: {type(pipeline).__name__} has no guidance_interval argument")
        sampling_kwargs["guidance_interval"] = tuple(args.guidance_interval)
    if args.guidance_channels is not None:
        if "guidance_channels" not in inspect.signature(pipeline.__call__).parameters:
            raise ValueError(f"--guidance_channels: {type(pipeline).__name__} has no guidance_channels argument")
        sampling_kwargs["guidance_channels"] = args.guidance_channels

    path = generate_samples(
        pipeline,
        args.output_dir,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        class_labels=class_labels,
        num_classes=num_classes,
        seed=args.seed,
        save_png=args.png,
        accelerator=accelerator,
        **sampling_kwargs,
    )
    if accelerator.is_main_process:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
