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
import math
from pathlib import Path

import torch
from accelerate import Accelerator

from diffusers_speedup.commands.common import PRECISIONS, load_pipeline, positive_int, renamed_values
from diffusers_speedup.distributed import check_world_size, wants_cpu_process_group
from diffusers_speedup.errors import one_line_errors, one_line_interrupt
from diffusers_speedup.evaluation import generate_samples
from diffusers_speedup.pipelines.pipeline_class_conditional import _model_num_classes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="diffusers-speedup sample", description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="pipeline folder or Hub id (model_index.json layout)")
    parser.add_argument("--output_dir", required=True, help="folder for shards, the merged .npz and PNGs")
    parser.add_argument("--num_samples", type=positive_int, default=50_000)
    parser.add_argument("--batch_size", type=positive_int, default=64, help="samples per shard and per pipeline call")
    parser.add_argument("--steps", type=positive_int, default=50, help="num_inference_steps")
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
    parser.add_argument("--num_classes", type=positive_int, default=None, help="default: read from the model's config")
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


def labels_for(pipeline, args) -> tuple[str, int | None]:
    """The label scheme and number of classes to sample, checked against the model before anything is written: a
    label it does not have would fail the run only at the shard that draws it, after the shards before it."""
    model_classes = infer_num_classes(pipeline)
    if model_classes is None:
        if args.num_classes is not None or args.class_labels not in (None, "none"):
            given = "--num_classes" if args.num_classes is not None else f"--class_labels {args.class_labels}"
            raise ValueError(
                f"{given}: the model of {args.pipeline} is unconditional (its config has no number of classes); "
                "sample it with --class_labels none and without --num_classes"
            )
        return "none", None
    if args.class_labels == "none":
        raise ValueError(
            f"--class_labels none: the model of {args.pipeline} is class-conditional ({model_classes} classes); use "
            "--class_labels balanced or random"
        )
    if args.num_classes is not None and args.num_classes > model_classes:
        raise ValueError(
            f"--num_classes {args.num_classes}: the model of {args.pipeline} has {model_classes} classes "
            f"(labels 0..{model_classes - 1})"
        )
    return args.class_labels or "balanced", args.num_classes or model_classes


def check_call(pipeline, conditional: bool, sampling_kwargs: dict) -> None:
    """The checks that ClassConditionalPipeline makes at each call before evaluating a network, made once before any
    shard is written, so that a bad setting is named without leaving a half-made run behind."""
    guidance_scale = sampling_kwargs["guidance_scale"]
    if not math.isfinite(guidance_scale):
        raise ValueError(f"--guidance_scale must be a finite number, got {guidance_scale}")
    pipeline.check_inputs("np", None, [], sampling_kwargs["num_inference_steps"], 1)
    pipeline._check_guidance_interval(sampling_kwargs.get("guidance_interval"))
    pipeline._check_guidance_channels(sampling_kwargs.get("guidance_channels"))
    pipeline._check_scheduler()
    pipeline._check_guide()
    # An unconditional model has no null label: it is guided only by a guide network.
    pipeline._label_ids_per_image([0] if conditional else None, 1, guidance_scale)


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

    class_labels, num_classes = labels_for(pipeline, args)
    sampling_kwargs = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
    if args.guidance_interval is not None:
        if "guidance_interval" not in inspect.signature(pipeline.__call__).parameters:
            raise ValueError(f"--guidance_interval: {type(pipeline).__name__} has no guidance_interval argument")
        sampling_kwargs["guidance_interval"] = tuple(args.guidance_interval)
    if args.guidance_channels is not None:
        if "guidance_channels" not in inspect.signature(pipeline.__call__).parameters:
            raise ValueError(f"--guidance_channels: {type(pipeline).__name__} has no guidance_channels argument")
        sampling_kwargs["guidance_channels"] = args.guidance_channels
    check_call(pipeline, class_labels != "none", sampling_kwargs)

    kept = f"the finished shards are kept in {args.output_dir}; the same command resumes"
    with one_line_interrupt(lambda: kept):
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
