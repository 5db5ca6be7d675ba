import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_speedup.evaluation.sampling import (
    float_images_to_uint8,
    generate_samples,
    load_samples,
    make_class_labels,
    merge_shards,
)


class FakePipeline:
    """Same call convention as DiTPipeline; images depend on the generator's noise and on the labels."""

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after
        self.kwargs_seen = []

    def __call__(self, class_labels, generator=None, output_type="pil", num_inference_steps=50, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.kwargs_seen.append(dict(kwargs, num_inference_steps=num_inference_steps, output_type=output_type))
        noise = torch.rand(len(class_labels), 4, 4, 3, generator=generator)
        labels = torch.tensor(class_labels, dtype=torch.float32).view(-1, 1, 1, 1)
        return SimpleNamespace(images=((noise + labels / 10) / 2).numpy())


class FakeAccelerator:
    """Rank `process_index` of `num_processes`; processes are run one after another in the test."""

    def __init__(self, process_index, num_processes):
        self.process_index = process_index
        self.num_processes = num_processes
        self.is_main_process = process_index == 0
        self.is_local_main_process = process_index == 0

    def wait_for_everyone(self):
        pass


RUN = dict(num_samples=11, batch_size=3, class_labels="balanced", num_classes=4, seed=7, num_inference_steps=2)


def read(path):
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def test_uint8_conversion_rounds_like_edm():
    x = np.array([-0.3, 0.0, 0.49 / 255, 0.5 / 255, 0.5, 254.5 / 255, 1.0, 1.7], dtype=np.float32)
    # EDM: clip(x * 127.5 + 128) on [-1, 1] images == floor(255 x + 0.5) on [0, 1]; 0.5 -> 128.
    np.testing.assert_array_equal(float_images_to_uint8(x), [0, 0, 0, 1, 128, 255, 255, 255])
    assert float_images_to_uint8(x).dtype == np.uint8


def test_balanced_labels_are_balanced_and_ordered():
    labels = make_class_labels("balanced", 50, 10, seed=0)
    assert Counter(labels.tolist()) == {c: 5 for c in range(10)}
    counts = Counter(make_class_labels("balanced", 23, 5, seed=0).tolist())
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 23
    np.testing.assert_array_equal(make_class_labels("balanced", 23, 5, seed=0), make_class_labels("balanced", 23, 5, 1))


def test_random_labels_are_seeded_and_in_range():
    a = make_class_labels("random", 200, 7, seed=3)
    np.testing.assert_array_equal(a, make_class_labels("random", 200, 7, seed=3))
    assert not np.array_equal(a, make_class_labels("random", 200, 7, seed=4))
    assert a.min() >= 0 and a.max() < 7 and len(set(a.tolist())) == 7


def test_bad_label_settings_are_named():
    with pytest.raises(ValueError, match="num_classes"):
        make_class_labels("balanced", 10, None, 0)
    with pytest.raises(ValueError, match="'sorted'"):
        make_class_labels("sorted", 10, 3, 0)
    with pytest.raises(ValueError, match="num_samples=4"):
        make_class_labels([1, 2], 4, 3, 0)
    with pytest.raises(ValueError, match="num_classes=3"):
        make_class_labels([0, 1, 2, 3], 4, 3, 0)


def test_adm_layout_and_pngs(tmp_path):
    pipe = FakePipeline()
    path = generate_samples(pipe, tmp_path, save_png=True, guidance_scale=1.5, **RUN)
    assert path == tmp_path / "samples_11x4x4x3.npz"
    archive = read(path)
    assert sorted(archive) == ["arr_0", "arr_1"]
    assert archive["arr_0"].dtype == np.uint8 and archive["arr_0"].shape == (11, 4, 4, 3)
    assert archive["arr_1"].dtype == np.int64
    np.testing.assert_array_equal(archive["arr_1"], np.arange(11) % 4)
    assert len({image.tobytes() for image in archive["arr_0"]}) == 11
    for i in (0, 5, 10):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / f"{i:06d}.png")), archive["arr_0"][i])
    assert pipe.calls == 4  # ceil(11 / 3) shards, one call each
    assert pipe.kwargs_seen[0] == {"guidance_scale": 1.5, "num_inference_steps": 2, "output_type": "np"}
    images, labels = load_samples(path)
    np.testing.assert_array_equal(images, archive["arr_0"])


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference = read(generate_samples(FakePipeline(), tmp_path / "straight", **RUN))

    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_samples(FakePipeline(fail_after=2), tmp_path / "resumed", **RUN)
    assert sorted(os.listdir(tmp_path / "resumed" / "shards")) == ["shard_000000.npz", "shard_000001.npz"]
    resumed_pipe = FakePipeline()
    resumed = read(generate_samples(resumed_pipe, tmp_path / "resumed", **RUN))
    assert resumed_pipe.calls == 2  # only the missing shards were made
    np.testing.assert_array_equal(resumed["arr_0"], reference["arr_0"])
    np.testing.assert_array_equal(resumed["arr_1"], reference["arr_1"])
    assert len({image.tobytes() for image in resumed["arr_0"]}) == RUN["num_samples"]


def test_two_processes_equal_one_even_after_a_crash(tmp_path):
    reference = read(generate_samples(FakePipeline(), tmp_path / "one", **RUN))

    # A one-process run dies after one shard; the job is then finished by two processes.
    with pytest.raises(RuntimeError):
        generate_samples(FakePipeline(fail_after=1), tmp_path / "two", **RUN)
    rank1 = FakePipeline()
    generate_samples(rank1, tmp_path / "two", accelerator=FakeAccelerator(1, 2), **RUN)
    assert rank1.calls == 2  # shards 1 and 3
    assert not list((tmp_path / "two").glob("samples_*.npz"))  # only the main process merges
    rank0 = FakePipeline()
    path = generate_samples(rank0, tmp_path / "two", accelerator=FakeAccelerator(0, 2), **RUN)
    assert rank0.calls == 1  # shard 2; shard 0 survived the crash
    merged = read(path)
    np.testing.assert_array_equal(merged["arr_0"], reference["arr_0"])
    np.testing.assert_array_equal(merged["arr_1"], reference["arr_1"])


def test_changed_settings_on_resume_are_refused(tmp_path):
    generate_samples(FakePipeline(), tmp_path, **RUN)
    with pytest.raises(ValueError, match="seed=7.*seed=8"):
        generate_samples(FakePipeline(), tmp_path, **{**RUN, "seed": 8})
    with pytest.raises(ValueError, match="num_inference_steps"):
        generate_samples(FakePipeline(), tmp_path, **{**RUN, "num_inference_steps": 3})


def test_merge_refuses_missing_shards(tmp_path):
    with pytest.raises(RuntimeError):
        generate_samples(FakePipeline(fail_after=1), tmp_path, **RUN)
    with pytest.raises(FileNotFoundError, match="3 of 4 shards are missing"):
        merge_shards(tmp_path, RUN["num_samples"], RUN["batch_size"])


def tiny_dit_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline hard-codes class 1000 as the unconditional label
        norm_type="ada_norm_zero",
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_with_diffusers_dit_pipeline(tmp_path):
    pipe = tiny_dit_pipeline()
    run = dict(num_samples=5, batch_size=2, class_labels="random", num_classes=1000, seed=1)
    sampling = dict(num_inference_steps=2, guidance_scale=1.5)
    reference = read(generate_samples(pipe, tmp_path / "a", **run, **sampling))
    assert reference["arr_0"].shape == (5, 4, 4, 3) and reference["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(reference["arr_1"], make_class_labels("random", 5, 1000, 1))

    # Killed inside the second shard's denoising loop (two scheduler steps per shard); the same pipeline resumes.
    step, calls = pipe.scheduler.step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("killed")
        return step(*args, **kwargs)

    pipe.scheduler.step = dying_step
    with pytest.raises(RuntimeError, match="killed"):
        generate_samples(pipe, tmp_path / "b", **run, **sampling)
    del pipe.scheduler.step
    resumed = read(generate_samples(pipe, tmp_path / "b", **run, **sampling))
    np.testing.assert_array_equal(resumed["arr_0"], reference["arr_0"])


WORKER = textwrap.dedent(
    """
    import sys
    from types import SimpleNamespace

    import torch
    from accelerate import Accelerator

    from diffusers_speedup.evaluation.sampling import generate_samples

    def pipe(class_labels, generator=None, output_type="np", **kwargs):
        noise = torch.rand(len(class_labels), 4, 4, 3, generator=generator)
        return SimpleNamespace(images=noise.numpy())

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == int(sys.argv[2])
    generate_samples(pipe, sys.argv[1], num_samples=7, batch_size=2, class_labels="random", num_classes=5, seed=3,
                     accelerator=accelerator, show_progress=False)
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(29500 + os.getpid() % 1000)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    command += [str(script), str(tmp_path / "two"), "2"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    two = read(tmp_path / "two" / "samples_7x4x4x3.npz")

    # The same run in this process, as a single process.
    namespace = {}
    exec(WORKER.split("accelerator = Accelerator")[0], namespace)
    one = read(
        generate_samples(
            namespace["pipe"],
            tmp_path / "one",
            num_samples=7,
            batch_size=2,
            class_labels="random",
            num_classes=5,
            seed=3,
        )
    )
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])


def load_script(name):
    import importlib

    return importlib.import_module(f"diffusers_speedup.commands.{name}")


def test_sample_cli_on_a_saved_pipeline_folder(tmp_path):
    tiny_dit_pipeline().save_pretrained(tmp_path / "pipe")
    cli = load_script("sample")
    argv = ["--pipeline", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "out"), "--num_samples", "3"]
    argv += ["--batch_size", "2", "--steps", "2", "--guidance_scale", "1.5", "--class_labels", "random", "--png"]
    cli.main(argv)
    archive = read(tmp_path / "out" / "samples_3x4x4x3.npz")
    assert archive["arr_0"].shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(archive["arr_1"], make_class_labels("random", 3, 1000, 0))
    assert len(list((tmp_path / "out" / "png").glob("*.png"))) == 3


def test_another_pipeline_or_scheduler_cannot_resume_into_the_same_shards(tmp_path):
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    first = tiny_dit_pipeline()
    torch.manual_seed(1)
    other_weights = tiny_dit_pipeline()
    other_scheduler = tiny_dit_pipeline()
    other_scheduler.transformer.load_state_dict(first.transformer.state_dict())
    other_scheduler.vae.load_state_dict(first.vae.state_dict())
    other_scheduler.scheduler = DDPMScheduler()
    run = dict(num_samples=4, batch_size=2, class_labels="random", num_classes=1000, seed=1, num_inference_steps=2)

    # Killed after the first shard, then resumed with other weights, another scheduler, or another setting.
    step, calls = first.scheduler.step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("killed")
        return step(*args, **kwargs)

    first.scheduler.step = dying_step
    with pytest.raises(RuntimeError, match="killed"):
        generate_samples(first, tmp_path, **run)
    del first.scheduler.step
    with pytest.raises(ValueError, match=r"made with pipeline.weights_sha256='[0-9a-f]{64}', this run has pipeline"):
        generate_samples(other_weights, tmp_path, **run)
    with pytest.raises(ValueError, match="pipeline.scheduler.class='DDIMScheduler', this run has pipeline.scheduler"):
        generate_samples(other_scheduler, tmp_path, **run)
    with pytest.raises(ValueError, match="sampling_kwargs.guidance_scale=None, this run has .*guidance_scale=2.0"):
        generate_samples(first, tmp_path, **run, guidance_scale=2.0)
    assert len(list((tmp_path / "shards").glob("*.npz"))) == 1
    # The same pipeline finishes the run.
    generate_samples(first, tmp_path, **run)
    assert (tmp_path / "samples_4x4x4x3.npz").is_file()


def test_sample_cli_refuses_another_pipeline_or_steps_in_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    tiny_dit_pipeline().save_pretrained(tmp_path / "a")
    torch.manual_seed(1)
    tiny_dit_pipeline().save_pretrained(tmp_path / "b")
    cli = load_script("sample")
    common = ["--output_dir", str(tmp_path / "out"), "--num_samples", "4", "--batch_size", "2", "--num_classes", "10"]
    cli.main(["--pipeline", str(tmp_path / "a"), "--steps", "2", *common])
    for changed, field in (("b", "pipeline.weights_sha256"), ("a", "sampling_kwargs.num_inference_steps")):
        with pytest.raises(SystemExit) as caught:
            cli.main(["--pipeline", str(tmp_path / changed), "--steps", "2" if changed == "b" else "3", *common])
        message = str(caught.value)
        assert message.startswith("error: ") and field in message and "\n" not in message


def test_sample_cli_names_a_missing_pipeline_folder_in_one_line(tmp_path):
    cli = load_script("sample")
    with pytest.raises(SystemExit) as caught:
        cli.main(["--pipeline", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"), "--num_samples", "2"])
    assert str(caught.value).startswith("error: ") and "nope" in str(caught.value)


@pytest.mark.slow
def test_sample_cli_under_torchrun_on_cpu_runs_as_two_ranks_of_one_run(tmp_path):
    torch.manual_seed(0)
    tiny_dit_pipeline().save_pretrained(tmp_path / "pipe")
    script = Path(__file__).resolve().parents[1] / "train" / "sample.py"
    argv = ["--pipeline", str(tmp_path / "pipe"), "--num_samples", "5", "--batch_size", "2", "--steps", "2"]
    argv += ["--num_classes", "10"]
    port = str(29500 + (os.getpid() + 7) % 1000)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [*command, str(script), *argv, "--output_dir", str(tmp_path / "two")],
        env=environment, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Only one of the two processes is the main process (two rank-0-of-1 runs would both report).
    assert result.stdout.count("wrote ") == 1
    load_script("sample").main([*argv, "--output_dir", str(tmp_path / "one")])
    two, one = read(tmp_path / "two" / "samples_5x4x4x3.npz"), read(tmp_path / "one" / "samples_5x4x4x3.npz")
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
    np.testing.assert_allclose(one["arr_0"].astype(int), two["arr_0"].astype(int), atol=1)


def test_sample_cli_guides_with_a_separate_network_on_the_first_channels(tmp_path):
    torch.manual_seed(0)
    tiny_dit_pipeline().save_pretrained(tmp_path / "main")
    torch.manual_seed(1)
    tiny_dit_pipeline().save_pretrained(tmp_path / "guide")
    cli = load_script("sample")
    common = ["--pipeline", str(tmp_path / "main"), "--num_samples", "2", "--batch_size", "2", "--steps", "2"]
    common += ["--num_classes", "10", "--guidance_scale", "2"]
    cli.main([*common, "--output_dir", str(tmp_path / "plain")])
    cli.main([*common, "--output_dir", str(tmp_path / "guided"), "--guide", str(tmp_path / "guide")])
    cli.main([*common, "--output_dir", str(tmp_path / "dit_rule"), "--guidance_channels", "3"])
    plain, guided, dit_rule = (
        json.loads((tmp_path / name / "sampling_config.json").read_text()) for name in ("plain", "guided", "dit_rule")
    )
    # The guide's weights are part of what produced the shards; the channel rule is a recorded setting.
    assert guided["pipeline"]["weights_sha256"] != plain["pipeline"]["weights_sha256"]
    assert dit_rule["sampling_kwargs"]["guidance_channels"] == 3
    images = [np.load(next((tmp_path / name).glob("samples_*.npz")))["arr_0"] for name in ("plain", "guided")]
    assert not np.array_equal(images[0], images[1])
    with pytest.raises(SystemExit, match="neither a pipeline folder"):
        cli.main([*common, "--output_dir", str(tmp_path / "bad"), "--guide", str(tmp_path)])


def test_sample_cli_draws_an_unconditional_model_without_labels(tmp_path):
    from diffusers import DDIMScheduler

    from diffusers_speedup import ClassConditionalPipeline, UViTModel

    torch.manual_seed(0)
    transformer = UViTModel(
        sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_attention_heads=4, num_classes=0, num_layers=3
    )
    ClassConditionalPipeline(transformer=transformer, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    cli = load_script("sample")
    cli.main(["--pipeline", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "out")]
             + ["--num_samples", "3", "--batch_size", "2", "--steps", "2"])  # fmt: skip
    config = json.loads((tmp_path / "out" / "sampling_config.json").read_text())
    assert config["class_labels"] == "none"
    with np.load(next((tmp_path / "out").glob("samples_3x8x8x3.npz"))) as merged:
        assert merged["arr_0"].shape == (3, 8, 8, 3) and "arr_1" not in merged  # no labels, as ADM's unconditional


def test_sample_cli_spells_precision_as_the_recipes_and_still_takes_no(tmp_path, capsys):
    tiny_dit_pipeline().save_pretrained(tmp_path / "pipe")
    cli = load_script("sample")
    argv = ["--pipeline", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "out"), "--num_samples", "2"]
    argv += ["--batch_size", "2", "--steps", "2", "--num_classes", "10"]
    cli.main([*argv, "--mixed_precision", "fp32"])
    config = json.loads((tmp_path / "out" / "sampling_config.json").read_text())
    assert config["mixed_precision"] == "no"  # the run records accelerate's word for fp32
    # The old value is the same setting: the finished run is taken as complete, not refused as another run.
    with pytest.warns(FutureWarning, match="--mixed_precision no is deprecated.*use --mixed_precision fp32"):
        cli.main([*argv, "--mixed_precision", "no"])
    assert cli.parse_args([*argv, "--mixed_precision", "bf16"]).mixed_precision == "bf16"
    with pytest.raises(SystemExit) as caught:
        cli.parse_args([*argv, "--mixed_precision", "fp8"])
    assert caught.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument --mixed_precision: invalid choice: 'fp8'" in last_line


def test_sample_and_export_load_pipelines_with_one_function(tmp_path):
    from diffusers import DiTPipeline

    from diffusers_speedup import ClassConditionalPipeline
    from diffusers_speedup.commands import common, export, sample

    assert sample.load_pipeline is export.load_pipeline is common.load_pipeline
    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    # export keeps the class a folder was saved with; sample drives it with the guidance options.
    assert type(common.load_pipeline(tmp_path / "dit")) is DiTPipeline
    pipeline = common.load_pipeline(tmp_path / "dit", class_conditional=True)
    assert type(pipeline) is ClassConditionalPipeline
    # A folder naming its pipeline as a shipped code file loads with the installed classes, without that file.
    pipeline.save_pretrained(tmp_path / "exported")
    index = json.loads((tmp_path / "exported" / "model_index.json").read_text())
    index["_class_name"] = ["pipeline_class_conditional", "ClassConditionalPipeline"]
    (tmp_path / "exported" / "model_index.json").write_text(json.dumps(index))
    assert type(common.load_pipeline(tmp_path / "exported")) is ClassConditionalPipeline


# ---------------------------------------------------------------------- a failed call leaves nothing in the way


def test_a_folder_without_samples_is_taken_over_by_a_run_with_other_settings(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_samples(FakePipeline(fail_after=0), tmp_path, **RUN)
    assert (tmp_path / "sampling_config.json").is_file() and not list((tmp_path / "shards").iterdir())
    path = generate_samples(FakePipeline(), tmp_path, **{**RUN, "seed": 8})
    assert json.loads((tmp_path / "sampling_config.json").read_text())["seed"] == 8
    fresh = generate_samples(FakePipeline(), tmp_path / "fresh", **{**RUN, "seed": 8})
    np.testing.assert_array_equal(read(path)["arr_0"], read(fresh)["arr_0"])
    # Once it holds samples, it is that run's.
    with pytest.raises(ValueError, match="holds shards of another sampling run: they were made with seed=8"):
        generate_samples(FakePipeline(), tmp_path, **RUN)


def ten_class_pipeline(folder: Path) -> Path:
    from diffusers import DDIMScheduler

    from diffusers_speedup import ClassConditionalPipeline, UViTModel

    transformer = UViTModel(
        sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_attention_heads=4, num_classes=10, num_layers=3
    )
    ClassConditionalPipeline(transformer=transformer, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--num_classes", "50"], "--num_classes 50: the model of .* has 10 classes \\(labels 0..9\\)"),
        (["--class_labels", "none"], "--class_labels none: the model of .* is class-conditional \\(10 classes\\)"),
        (["--guidance_interval", "2", "1"], "guidance_interval needs 0 <= sigma_lo <= sigma_hi"),
        (["--guidance_scale", "nan"], "--guidance_scale must be a finite number"),
    ],
)
def test_sample_cli_checks_the_arguments_against_the_pipeline_before_writing(bad, message, tmp_path):
    pipe = ten_class_pipeline(tmp_path / "pipe")
    cli = load_script("sample")
    argv = ["--pipeline", str(pipe), "--output_dir", str(tmp_path / "out"), "--num_samples", "16", "--batch_size", "4"]
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        cli.main([*argv, "--steps", "2", *bad])
    assert not (tmp_path / "out").exists()
    cli.main([*argv, "--steps", "2"])  # the corrected rerun
    assert (tmp_path / "out" / "samples_16x8x8x3.npz").is_file()


def test_sample_cli_refuses_a_non_positive_count_before_loading_anything(tmp_path, capsys):
    cli = load_script("sample")
    with pytest.raises(SystemExit) as caught:
        cli.main(["--pipeline", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "out"), "--steps", "0"])
    assert caught.value.code == 2
    assert "argument --steps: must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sample_cli_refuses_labels_for_an_unconditional_model(tmp_path):
    from diffusers import DDIMScheduler

    from diffusers_speedup import ClassConditionalPipeline, UViTModel

    transformer = UViTModel(
        sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_attention_heads=4, num_classes=0, num_layers=3
    )
    ClassConditionalPipeline(transformer=transformer, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    cli = load_script("sample")
    argv = ["--pipeline", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "out"), "--steps", "2"]
    with pytest.raises(SystemExit, match="--class_labels balanced: the model of .* is unconditional"):
        cli.main([*argv, "--class_labels", "balanced"])
    with pytest.raises(SystemExit, match="needs a null label or a guide network"):
        cli.main([*argv, "--guidance_scale", "2"])
    assert not (tmp_path / "out").exists()


def test_sample_cli_says_that_a_mistyped_pipeline_folder_does_not_exist(tmp_path):
    ten_class_pipeline(tmp_path / "runs" / "pipeline")
    cli = load_script("sample")
    for mistyped in (tmp_path / "runs" / "pipelin", tmp_path / "run" / "pipeline"):
        with pytest.raises(SystemExit, match=f"^error: pipeline folder {mistyped} does not exist$"):
            cli.main(["--pipeline", str(mistyped), "--output_dir", str(tmp_path / "out")])
