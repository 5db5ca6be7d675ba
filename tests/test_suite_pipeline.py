"""The properties diffusers' `PipelineTesterMixin` checks, for ClassConditionalPipeline with DiT, U-ViT and EDM2.

diffusers' mixins live in its GitHub test folder, which neither the wheel nor the sdist ships. Checked here, for
diffusers' DiTTransformer2DModel (+ AutoencoderKL, DDIM), UViTModel (pixels, DPM-Solver) and EDM2UNetModel (pixels,
EDM Heun, with an unconditional EDM2 guide network): the call signature, save/load (safetensors and pickle, with and
without the optional components, with variants), dict/tuple outputs, `components`, batch consistency and
batch-vs-single identity with per-image generators, `num_images_per_prompt`, guidance on/off, `callback_on_step_end`
(tensor inputs, `num_timesteps`, changing `_guidance_scale`), the progress bar and its config, `to(dtype)` /
`to(device)`, loading and inference in bfloat16, and attention slicing.

Mixin tests that do not apply, and why:
- `test_save_load_optional_components` sets *every* optional component to None. `transformer` and `unet` are both
  optional because a pipeline has exactly one of them; with both None there is no network. Here every optional
  component but the pipeline's own network is set to None.
- `test_float16_inference`, `test_save_load_float16`, `test_to_device` to CUDA, `test_model_cpu_offload*`,
  `test_sequential_cpu_offload*`, `test_group_offloading_inference`, `test_pipeline_with_accelerator_device_map`,
  `test_xformers_attention_forwardGenerator_pass`: need an accelerator (or xformers); on CPU the dtype, device and
  save/load parts are checked with bfloat16 / float16 storage.
- `test_encode_prompt_works_in_isolation`, `test_StableDiffusionMixin`, `test_pt_np_pil_inputs_equivalent`,
  `test_latents_input` (PipelineLatentTesterMixin's image inputs), `test_karras_schedulers_shape`: no prompts and no
  image inputs; every scheduler the pipeline runs is checked against a closed form in
  tests/test_pipeline_class_conditional.py instead of for output shapes only.
- The deprecated `callback` / `callback_steps` arguments of older mixins: only `callback_on_step_end` exists.
- `test_layerwise_casting_inference`: the model-level property is in tests/test_suite_models.py.
- `test_save_load_dduf`: diffusers 0.42 no longer loads pipelines from DDUF files.
- Hub push tests: no network in these tests.
"""

import contextlib
import inspect
import io
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler
from tiny_models import TINY_EDM2, wake_gains

from diffusers_speedup.models.edm2_unet import EDM2UNetModel
from diffusers_speedup.models.uvit import UViTModel
from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline
from diffusers_speedup.schedulers.scheduling_edm_heun import EDMHeunScheduler

# What a class-conditional pipeline takes (diffusers' CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS) and what every
# pipeline must take with a default (PipelineTesterMixin.required_optional_params, without the deprecated ones).
PARAMS = frozenset(["class_labels"])
BATCH_PARAMS = frozenset(["class_labels"])
REQUIRED_OPTIONAL_PARAMS = frozenset(
    ["num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type", "return_dict"]
)


def to_np(output):
    return output.detach().cpu().numpy() if isinstance(output, torch.Tensor) else np.asarray(output)


class PipelineSuite:
    """diffusers-style pipeline checks; subclasses give the components and the inputs."""

    pipeline_class = ClassConditionalPipeline

    def get_dummy_components(self) -> dict:
        raise NotImplementedError

    def get_dummy_inputs(self, seed=0) -> dict:
        return {
            "class_labels": [1],
            "generator": torch.Generator().manual_seed(seed),
            "num_inference_steps": 2,
            "guidance_scale": 2.0,
            "output_type": "np",
        }

    def make_pipe(self, **overrides):
        pipe = self.pipeline_class(**{**self.get_dummy_components(), **overrides})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --------------------------------------------------------------------------------------------------------------

    def test_call_signature(self):
        parameters = inspect.signature(self.pipeline_class.__call__).parameters
        assert PARAMS <= set(parameters)
        optional = {name for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
        assert REQUIRED_OPTIONAL_PARAMS <= optional
        assert {"callback_on_step_end", "callback_on_step_end_tensor_inputs", "guidance_scale"} <= optional

    @pytest.mark.parametrize("safe_serialization", [True, False])
    def test_save_load_local(self, tmp_path, safe_serialization):
        pipe = self.make_pipe()
        output = pipe(**self.get_dummy_inputs())[0]
        pipe.save_pretrained(tmp_path, safe_serialization=safe_serialization)
        loaded = self.pipeline_class.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        for name, component in pipe.components.items():
            assert type(loaded.components[name]) is type(component), name
        np.testing.assert_allclose(to_np(loaded(**self.get_dummy_inputs())[0]), to_np(output), atol=5e-4)

    def test_save_load_optional_components(self, tmp_path):
        pipe = self.make_pipe()
        network = "transformer" if pipe.transformer is not None else "unet"
        cleared = [name for name in pipe._optional_components if name not in (network, "transformer", "unet")]
        for name in cleared:
            setattr(pipe, name, None)
        output = pipe(**self.get_dummy_inputs())[0]
        pipe.save_pretrained(tmp_path, safe_serialization=False)
        loaded = self.pipeline_class.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        for name in cleared + [other for other in ("transformer", "unet") if other != network]:
            assert getattr(loaded, name) is None, f"{name} did not stay None after loading"
        np.testing.assert_allclose(to_np(loaded(**self.get_dummy_inputs())[0]), to_np(output), atol=1e-4)

    def test_serialization_and_loading_with_variants(self, tmp_path):
        pipe = self.make_pipe()
        pipe.save_pretrained(tmp_path, variant="fp16")
        model_components = [name for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)]
        for name in model_components:
            files = [path.name for path in (tmp_path / name).iterdir()]
            assert any("fp16" in file for file in files if file != "config.json"), (name, files)
        loaded = self.pipeline_class.from_pretrained(tmp_path, variant="fp16")
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(
            to_np(loaded(**self.get_dummy_inputs())[0]), to_np(pipe(**self.get_dummy_inputs())[0]), atol=1e-4
        )

    def test_dict_tuple_outputs_equivalent(self):
        pipe = self.make_pipe()
        as_dict = pipe(**self.get_dummy_inputs())[0]
        as_tuple = pipe(**self.get_dummy_inputs(), return_dict=False)[0]
        np.testing.assert_allclose(to_np(as_tuple), to_np(as_dict), atol=1e-4)

    def test_components_function(self):
        components = self.get_dummy_components()
        pipe = self.pipeline_class(**components)
        assert set(pipe.components) == set(components)

    def test_inference_batch_consistent(self):
        pipe = self.make_pipe()
        for batch_size in (2, 3):
            inputs = self.get_dummy_inputs()
            inputs["class_labels"] = batch_size * [inputs["class_labels"]]  # nested, as the mixin batches it
            inputs["generator"] = [torch.Generator().manual_seed(i) for i in range(batch_size)]
            assert len(pipe(**inputs)[0]) == batch_size

    def test_inference_batch_single_identical(self):
        pipe = self.make_pipe()
        single = pipe(**self.get_dummy_inputs())[0]
        inputs = self.get_dummy_inputs()
        inputs["class_labels"] = 3 * [inputs["class_labels"]]
        inputs["generator"] = [torch.Generator().manual_seed(i) for i in range(3)]
        batch = pipe(**inputs)[0]
        assert batch.shape[0] == 3
        assert np.abs(to_np(batch)[0] - to_np(single)[0]).max() < 1e-4

    def test_num_images_per_prompt(self):
        pipe = self.make_pipe()
        for batch_size in (1, 2):
            for per_label in (1, 2):
                inputs = self.get_dummy_inputs()
                inputs["class_labels"] = batch_size * [inputs["class_labels"]]
                assert pipe(**inputs, num_images_per_prompt=per_label)[0].shape[0] == batch_size * per_label

    def test_cfg(self):
        pipe = self.make_pipe()
        inputs = self.get_dummy_inputs()
        unguided = pipe(**{**inputs, "guidance_scale": 1.0, "generator": torch.Generator().manual_seed(0)})[0]
        guided = pipe(**{**inputs, "guidance_scale": 7.5, "generator": torch.Generator().manual_seed(0)})[0]
        assert guided.shape == unguided.shape and not np.allclose(guided, unguided)

    def test_callback_inputs(self):
        pipe = self.make_pipe()
        assert pipe._callback_tensor_inputs == ["latents"]

        def all_inputs(pipeline, i, t, callback_kwargs):
            assert set(callback_kwargs) == set(pipeline._callback_tensor_inputs)
            return callback_kwargs

        pipe(**self.get_dummy_inputs(), callback_on_step_end=all_inputs, callback_on_step_end_tensor_inputs=["latents"])

        def zero_last_latents(pipeline, i, t, callback_kwargs):
            if i == pipeline.num_timesteps - 1:
                callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
            return callback_kwargs

        inputs = {**self.get_dummy_inputs(), "output_type": "latent"}
        output = pipe(**inputs, callback_on_step_end=zero_last_latents)[0]
        assert output.abs().sum() == 0

    def test_callback_cfg(self):
        pipe = self.make_pipe()

        def increase_guidance(pipeline, i, t, callback_kwargs):
            pipeline._guidance_scale += 1.0
            return callback_kwargs

        inputs = self.get_dummy_inputs()
        pipe(**inputs, callback_on_step_end=increase_guidance)
        assert pipe.guidance_scale == inputs["guidance_scale"] + pipe.num_timesteps

    def test_progress_bar(self):
        pipe = self.pipeline_class(**self.get_dummy_components())
        with io.StringIO() as stderr, contextlib.redirect_stderr(stderr):
            pipe(**self.get_dummy_inputs())
            text = stderr.getvalue()
        total = re.search(r"/(\d+) ", text).group(1)
        assert f"{total}/{total}" in text and int(total) == pipe.num_timesteps
        pipe.set_progress_bar_config(disable=True)
        with io.StringIO() as stderr, contextlib.redirect_stderr(stderr):
            pipe(**self.get_dummy_inputs())
            assert stderr.getvalue() == ""

    def test_to_dtype_and_device(self):
        components = self.get_dummy_components()
        pipe = self.pipeline_class(**components)
        modules = [c for c in components.values() if isinstance(c, torch.nn.Module)]
        assert all(module.dtype == torch.float32 for module in modules)
        pipe.to(dtype=torch.float16)
        assert all(module.dtype == torch.float16 for module in modules)
        pipe.to("cpu")
        assert all(module.device.type == "cpu" for module in modules) and pipe.device.type == "cpu"

    def test_save_load_and_infer_in_bfloat16(self, tmp_path):
        # One evaluation: several steps of an untrained network amplify rounding differences chaotically.
        inputs = {**self.get_dummy_inputs(), "output_type": "latent", "num_inference_steps": 1}
        pipe = self.make_pipe()
        reference = pipe(**inputs)[0]
        pipe.save_pretrained(tmp_path)
        low = self.pipeline_class.from_pretrained(tmp_path, dtype=torch.bfloat16)
        low.set_progress_bar_config(disable=True)
        for name, component in low.components.items():
            if isinstance(component, torch.nn.Module):
                assert component.dtype == torch.bfloat16, f"{name} is {component.dtype} after loading in bfloat16"
        output = low(**{**inputs, "generator": torch.Generator().manual_seed(0)})[0]
        assert output.dtype == torch.float32 and torch.isfinite(output).all()  # the sampler state stays float32
        assert (output - reference).norm() / reference.norm() < 0.05

    def test_attention_slicing_forward_pass(self):
        pipe = self.make_pipe()
        without = pipe(**self.get_dummy_inputs())[0]
        pipe.enable_attention_slicing(slice_size=1)
        with_slicing = pipe(**self.get_dummy_inputs())[0]
        assert np.abs(with_slicing - without).max() < 1e-3


class TestDiTPipeline(PipelineSuite):
    def get_dummy_components(self):
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=4,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
        )
        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=(8,), norm_num_groups=8, latent_channels=4, down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",), sample_size=8,
        )  # fmt: skip
        return {"transformer": transformer, "unet": None, "vae": vae, "guide": None, "scheduler": DDIMScheduler()}


class TestUViTPipeline(PipelineSuite):
    def get_dummy_components(self):
        torch.manual_seed(0)
        transformer = UViTModel(
            sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_attention_heads=4, num_classes=10,
            num_layers=3,
        )  # fmt: skip
        # Fresh U-ViT heads are small; wake them so that guidance changes the samples visibly.
        with torch.no_grad():
            for param in transformer.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        scheduler = DPMSolverMultistepScheduler()
        return {"transformer": transformer, "unet": None, "vae": None, "guide": None, "scheduler": scheduler}


class TestEDM2PipelineWithGuide(PipelineSuite):
    def get_dummy_components(self):
        config = {**TINY_EDM2, "sample_size": 8, "attn_resolutions": (4,)}
        torch.manual_seed(0)
        unet = wake_gains(EDM2UNetModel(**{**config, "num_classes": 5}))
        guide = wake_gains(EDM2UNetModel(**{**config, "num_classes": 0}))  # EDM2's guided FIDs: unconditional guide
        scheduler = EDMHeunScheduler(prediction_type="sample")
        return {"transformer": None, "unet": unet, "vae": None, "guide": guide, "scheduler": scheduler}
