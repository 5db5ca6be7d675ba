"""Markdown tables for docs/benchmarks.md from the JSON files that benchmarks/gpu/run_suite.sh brings back.

    python benchmarks/gpu/report.py outputs/gpu_suite                 # a folder: every *.json in it
    python benchmarks/gpu/report.py summary.json train_dit_xl.json ...

Prints the machine and date (from ``summary.json``), the exact commands, and one table per benchmark in the column
layout of docs/benchmarks.md's GPU sections: training throughput (one table per setting: eager, torch.compile;
with REPA's step-time overhead on SiT-XL/2 when both SiT-XL/2 rows are there),
sampling speed (the two DiT pipelines side by side, then the EDM2 guidance variants) and latent caching. Steps of the
suite that did not finish are listed, so that a missing row is never mistaken for a measured one. Standard library
only: it runs anywhere.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

MODEL_ORDER = ["dit-b-2", "dit-xl-2", "uvit-l-2", "edm2-xs", "sit-xl-2", "sit-xl-2+repa"]
TRAIN_HEADER = [
    "| model | batch | loop | img/s | step (ms) | MFU | peak mem (GiB) | package / plain |",
    "|---|---|---|---|---|---|---|---|",
]
SAMPLING_HEADER = ["| case | pipeline | NFE / image | wall (s) | img/s |", "|---|---|---|---|---|"]
CACHING_HEADER = ["| stage | img/s | what it includes |", "|---|---|---|"]
SCHEDULER_NAMES = {"ddim": "DDIM", "dpm_solver": "DPM-Solver++"}
# The goals of docs/benchmarks.md.
GOAL_MFU, GOAL_RATIO, GOAL_CACHING = 0.45, 1.5, 1000.0


def kind_of(data) -> str:
    """Which file of the suite this is: "summary", "training", "sampling" or "caching"."""
    if isinstance(data, dict):
        if "suite" in data:
            return "summary"
        if data.get("benchmark") == "cache_latents":
            return "caching"
        results = data.get("results")
        if isinstance(results, list) and results:
            if "loop" in results[0]:
                return "training"
            if "nfe_per_image" in results[0]:
                return "sampling"
    return "unknown"


def load(paths: list[str]) -> dict[str, list[tuple[str, dict]]]:
    """Read the JSON files (folders: every ``*.json`` inside), grouped by kind."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.json")))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"report.py: no such file or folder: {path}")
    grouped: dict[str, list[tuple[str, dict]]] = {}
    for file in files:
        with open(file) as f:
            data = json.load(f)
        kind = kind_of(data)
        if kind == "unknown":
            raise ValueError(f"report.py: {file} is not a result of benchmarks/gpu/run_suite.sh")
        grouped.setdefault(kind, []).append((file, data))
    return grouped


def shown_command(command: str) -> str:
    """A benchmark's command as a reader would type it: without the suite's scratch output paths."""
    words, kept = command.split(), []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word == "--output_dir":
            skip = True
        elif not word.startswith("--output_dir="):
            kept.append(word)
    if kept and os.path.basename(kept[0]).startswith("python"):
        kept[0] = "python"
    return " ".join(kept)


def _fmt(value, pattern: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, pattern)


# ---- machine -------------------------------------------------------------------------------------------------------


def machine_lines(summaries: list[tuple[str, dict]]) -> list[str]:
    if not summaries:
        return ["Machine and date: not recorded (no summary.json among the inputs)."]
    _, summary = summaries[-1]
    environment = summary.get("environment", {})
    torch_info = environment.get("torch", {})
    smi = (environment.get("nvidia_smi", {}).get("gpus") or [{}])[0]
    gpu = torch_info.get("device_name") or smi.get("name") or "no GPU"
    details = [
        f"driver {smi['driver_version']}" if smi.get("driver_version") else None,
        f"{torch_info['memory_gib']} GiB" if torch_info.get("memory_gib") else None,
        f"power limit {smi['power.limit']}" if smi.get("power.limit") else None,
    ]
    packages = environment.get("packages", {})
    software = ", ".join(
        f"{name} {packages[name]}" for name in ("torch", "diffusers", "accelerate", "datasets") if packages.get(name)
    )
    details_text = ", ".join(d for d in details if d)
    lines = [
        f"Machine: {gpu}{f' ({details_text})' if details_text else ''}, CUDA {torch_info.get('cuda')}, "
        f"{environment.get('cpus_usable')} usable CPU cores, {environment.get('memory_gib')} GiB memory; "
        f"Python {environment.get('python')}, {software}. Date: {environment.get('date', 'not recorded')}.",
        "",
        f"Suite: `{summary.get('command')}`"
        + (f" at commit {summary['commit']}" if summary.get("commit") else "")
        + f", {summary.get('elapsed_seconds')} s of a {summary.get('budget_seconds')} s budget.",
    ]
    unfinished = [step for step in summary.get("steps", []) if step.get("status") != "ok"]
    if unfinished:
        lines += ["", "Steps that did not finish (their rows are missing below; see suite.log):", ""]
        lines += [
            f"- {step['step']}: {step['status']}"
            + (f" (exit {step['exit_code']}, {step['seconds']} s)" if step.get("exit_code") is not None else "")
            + f": `{shown_command(step['command'])}`"
            for step in unfinished
        ]
    return lines


# ---- training ------------------------------------------------------------------------------------------------------


def training_sections(files: list[tuple[str, dict]]) -> list[str]:
    """One table per setting (compile, EMA, precision); rows in the docs' model order, one per loop."""
    settings: dict[tuple, list[tuple[str, dict]]] = {}
    for file, data in files:
        env = data["environment"]
        settings.setdefault((env.get("compile"), env.get("ema"), env.get("mixed_precision")), []).append((file, data))
    lines = []
    for (compile_, ema, precision), group in sorted(settings.items(), key=lambda item: bool(item[0][0])):
        title = "torch.compile of the package loop's model (the plain loop stays eager)" if compile_ else "eager"
        lines += ["", f"### Training throughput: {title}", "", "```bash"]
        lines += [shown_command(data["environment"]["command"]) for _, data in group]
        lines += ["```", ""]
        schedules = [(data["environment"]["steps"], data["environment"]["warmup_steps"]) for _, data in group]
        runs = "; ".join(
            ("" if len(set(schedules)) == 1 else f"{', '.join(_models(data))}: ")
            + f"{steps} timed steps after {warmup} warm-up steps"
            for (_, data), (steps, warmup) in zip(group, schedules)
            if len(set(schedules)) > 1 or data is group[0][1]
        )
        devices = sorted({data["environment"]["device"] for _, data in group})
        lines += [
            f"Device: {', '.join(devices)}; mixed precision {precision}; EMA {'on' if ema else 'off'}; {runs}.",
            "",
        ]
        lines += TRAIN_HEADER
        results = [result for _, data in group for result in data["results"]]
        by_model: dict[str, dict[str, dict]] = {}
        for result in results:
            by_model.setdefault(result["model"], {})[result["loop"]] = result
        for model in sorted(by_model, key=_model_key):
            loops = by_model[model]
            package, plain = loops.get("package"), loops.get("plain")
            ratio = None
            if package and plain and package.get("images_per_second") and plain.get("images_per_second"):
                ratio = package["images_per_second"] / plain["images_per_second"]
            for loop in ("package", "plain"):
                result = loops.get(loop)
                if result is None:
                    continue
                if result.get("error"):
                    lines.append(f"| {model} | {result['batch_size']} | {loop} | {result['error']} | | | | |")
                    continue
                ratio_cell = f"{ratio:.2f}×" if loop == "package" and ratio else ""
                lines.append(
                    f"| {model} | {result['batch_size']} | {loop} | {result['images_per_second']:.1f} "
                    f"| {_fmt(result['step_seconds'], '.1f', 1e3)} | {_fmt(result['mfu'], '.1%')} "
                    f"| {_fmt(result['peak_memory_gib'], '.1f')} | {ratio_cell} |"
                )
        goal = _dit_xl_goal(by_model.get("dit-xl-2", {}))
        if goal:
            lines += ["", goal]
        overhead = _repa_overhead(by_model.get("sit-xl-2", {}), by_model.get("sit-xl-2+repa", {}))
        if overhead:
            lines += ["", overhead]
    return lines


def _models(data: dict) -> list[str]:
    return sorted({result["model"] for result in data["results"]}, key=_model_key)


def _model_key(model: str):
    return (MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER), model)


def _dit_xl_goal(loops: dict[str, dict]) -> str | None:
    package, plain = loops.get("package"), loops.get("plain")
    if not package or package.get("mfu") is None or not plain or not plain.get("images_per_second"):
        return None
    ratio = package["images_per_second"] / plain["images_per_second"]
    met = package["mfu"] >= GOAL_MFU and ratio >= GOAL_RATIO
    return (
        f"DiT-XL/2 goal (≥ {GOAL_MFU:.0%} MFU and ≥ {GOAL_RATIO}× the plain loop): {package['mfu']:.1%} MFU, "
        f"{ratio:.2f}× — {'met' if met else 'not met'}."
    )


def _repa_overhead(without: dict[str, dict], with_repa: dict[str, dict]) -> str | None:
    """REPA's cost on SiT-XL/2: the step time with it over the step time without it, loop by loop, next to what
    the model FLOPs predict (the encoder's forward and the projector's forward and backward, from flops.py)."""
    measured, predicted = [], None
    for loop in ("package", "plain"):
        base, aligned = without.get(loop), with_repa.get(loop)
        if not base or not aligned:
            continue
        if base.get("train_gflops_per_image") and aligned.get("train_gflops_per_image"):
            predicted = aligned["train_gflops_per_image"] / base["train_gflops_per_image"] - 1
        if base.get("step_seconds") and aligned.get("step_seconds"):
            measured.append(f"{aligned['step_seconds'] / base['step_seconds'] - 1:+.1%} in the {loop} loop")
    if not measured:
        return None
    flops = "" if predicted is None else f"; model FLOPs {predicted:+.1%}"
    return (
        f"REPA on SiT-XL/2 (the encoder's forward and the projector{flops}): step time {', '.join(measured)} "
        "(sit-xl-2+repa against sit-xl-2)."
    )


# ---- sampling ------------------------------------------------------------------------------------------------------


def sampling_case_label(result: dict) -> str:
    """The docs' name of a case: "DDIM 250, w = 1.5", "EDM2-XS Heun 32, w = 2, σ ∈ (0.19, 1.61]", ..."""
    steps, guidance = result["num_inference_steps"], result["guidance_scale"]
    if result["scheduler"] == "edm_heun":
        model = result["case"].split(" heun")[0].upper()
        name = f"{model} Heun {steps}"
        if guidance == 1.0:
            return f"{name}, no CFG"
        interval = result.get("guidance_interval")
        where = f"σ ∈ ({interval[0]:g}, {interval[1]:g}]" if interval else "full CFG"
        return f"{name}, w = {guidance:g}, {where}"
    name = SCHEDULER_NAMES.get(result["scheduler"], result["scheduler"])
    return f"{name} {steps}, w = {guidance:g}"


def sampling_section(files: list[tuple[str, dict]]) -> list[str]:
    lines = []
    for _, data in files:
        env = data["environment"]
        lines += ["", "### Sampling speed", "", "```bash", shown_command(env["command"]), "```", ""]
        lines += [f"Device: {env['device']}; dtype {env['dtype']}; batch {env['batch_size']}.", ""]
        lines += SAMPLING_HEADER
        by_case: dict[str, list[dict]] = {}
        for result in data["results"]:
            by_case.setdefault(result["case"], []).append(result)
        for results in by_case.values():
            lines.append(
                f"| {sampling_case_label(results[0])} | {' / '.join(r['pipeline'] for r in results)} "
                f"| {' / '.join(format(r['nfe_per_image'], '.0f') for r in results)} "
                f"| {' / '.join(format(r['seconds'], '.2f') for r in results)} "
                f"| {' / '.join(format(r['images_per_second'], '.2f') for r in results)} |"
            )
        full = next((r for r in data["results"] if r["case"].endswith("full CFG")), None)
        limited = next((r for r in data["results"] if r["case"].endswith("interval CFG")), None)
        if full and limited:
            lines += [
                "",
                f"Limited-interval guidance: {1 - limited['nfe_per_image'] / full['nfe_per_image']:.0%} fewer network "
                f"evaluations ({full['nfe_per_image']:.0f} → {limited['nfe_per_image']:.0f} per image), "
                f"{1 - limited['seconds'] / full['seconds']:.0%} less wall time.",
            ]
    return lines


# ---- caching -------------------------------------------------------------------------------------------------------


def caching_section(files: list[tuple[str, dict]]) -> list[str]:
    lines = []
    for _, data in files:
        lines += ["", "### Latent caching", "", "```bash", shown_command(data["command"]), "```", ""]
        device = data.get("device_name") or data.get("device")
        lines += [
            f"Device: {device}; {data.get('cpus_usable')} usable CPU cores; VAE {data.get('vae')} in "
            f"{data.get('dtype')}; {data.get('resolution')} px; batch {data.get('batch_size')}; "
            f"{data.get('num_workers')} decoding workers; {data.get('generated_images', 'no')} generated "
            f"{data.get('image_width')}×{data.get('image_height')} JPEGs.",
            "",
        ]
        if data.get("error"):
            lines += [f"The run failed: {data['error']}", ""]
        lines += CACHING_HEADER
        rows = [
            ("JPEG decode + ADM centre crop", "decode_images_per_second", "CPU workers only"),
            ("VAE encode (image + mirror)", "vae_images_per_second", "the encoder alone, pixels already in memory"),
            (
                "`cache_latents` end to end",
                "end_to_end_images_per_second",
                f"{data.get('end_to_end_images', '?')} images in {data.get('end_to_end_seconds', '?')} s: decoding, "
                "encoding, writing, setup and the final save",
            ),
        ]
        for stage, key, what in rows:
            lines.append(f"| {stage} | {_fmt(data.get(key), ',.1f')} | {what} |")
        rate = data.get("end_to_end_images_per_second")
        if rate is not None and str(data.get("device", "")).startswith("cuda"):
            verdict = "met" if rate >= GOAL_CACHING else "not met"
            lines += ["", f"Goal (≥ {GOAL_CACHING:,.0f} img/s end to end): {rate:,.1f} img/s — {verdict}."]
    return lines


def format_report(grouped: dict[str, list[tuple[str, dict]]]) -> str:
    lines = machine_lines(grouped.get("summary", []))
    lines += training_sections(grouped.get("training", []))
    lines += sampling_section(grouped.get("sampling", []))
    lines += caching_section(grouped.get("caching", []))
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="JSON files of the suite, or folders holding them")
    args = parser.parse_args(argv)
    try:
        report = format_report(load(args.paths))
    except (OSError, ValueError, KeyError) as error:
        parser.error(str(error))
    sys.stdout.write(report)
    return report


if __name__ == "__main__":
    main()
