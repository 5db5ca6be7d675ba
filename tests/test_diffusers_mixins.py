"""Opt-in: diffusers' own common test mixins, run against this package's classes.

The mixins live in diffusers' GitHub `tests/` folder, which neither the wheel nor the sdist ships. Point
`DIFFUSERS_TESTS_DIR` at a checkout of huggingface/diffusers (the repository root, matching the installed diffusers
version) to run them:

    DIFFUSERS_TESTS_DIR=~/src/diffusers python -m pytest -q tests/test_diffusers_mixins.py

The checkout's test modules need diffusers' own test dependencies (`parameterized`, `requests-mock`, from
diffusers' `test` extra).

Without it every test here is skipped with that reason. The same properties are checked without a checkout by
tests/test_suite_edm_heun_scheduler.py, tests/test_suite_models.py and tests/test_suite_pipeline.py, whose docstrings
list the mixin tests that do not apply and why; those tests are skipped here with the same reasons.
"""

import importlib
import importlib.util
import os
import sys
import unittest
from pathlib import Path

import pytest
import test_suite_models as model_suite
import test_suite_pipeline as pipeline_suite
import torch

from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline
from diffusers_speedup.schedulers.scheduling_edm_heun import EDMHeunScheduler

CHECKOUT = os.environ.get("DIFFUSERS_TESTS_DIR")
# The checkout's tests/ folder is imported under this name: `tests` is this repository's own test folder.
PACKAGE = "diffusers_repo_tests"


def load_mixin_modules(checkout: str) -> dict:
    tests_dir = Path(checkout).expanduser() / "tests"
    expected = {
        "schedulers": "schedulers/test_schedulers.py",
        "models": "models/test_modeling_common.py",
        "pipelines": "pipelines/test_pipelines_common.py",
        "params": "pipelines/pipeline_params.py",
    }
    missing = [path for path in expected.values() if not (tests_dir / path).is_file()]
    if missing:
        raise FileNotFoundError(f"DIFFUSERS_TESTS_DIR={checkout} is not a diffusers checkout: no tests/{missing[0]}")
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True))
    package.__path__ = [str(tests_dir)]
    sys.modules[PACKAGE] = package
    return {key: importlib.import_module(f"{PACKAGE}.{path[:-3].replace('/', '.')}") for key, path in expected.items()}


if CHECKOUT is None:
    pytest.skip(
        "set DIFFUSERS_TESTS_DIR to a huggingface/diffusers checkout to run diffusers' own test mixins",
        allow_module_level=True,
    )
mixins = load_mixin_modules(CHECKOUT)  # an import error of the checkout's test modules is reported as it is


def not_applicable(reason: str):
    @unittest.skip(reason)
    def test(self):
        pass

    return test


OFF_GRID = (
    "the mixin calls scale_model_input(sample, 0.0) (it special-cases only diffusers' EDMEulerScheduler), and 0.0 "
    "is no c_noise = ln(σ)/4 of the σ grid; EDMHeunScheduler raises a ValueError instead of guessing (checked with "
    "grid timesteps in tests/test_suite_edm_heun_scheduler.py)"
)
NO_BETAS = "EDM has no β schedule, clipping or thresholding"
NO_PROCESSORS = "the model calls PyTorch's SDPA directly and has no diffusers attention processors"
NO_ADAPTERS = "the model has no PEFT adapter loader mixin"
NOT_IN_DIFFUSERS = (
    "AutoModel resolves a config's `_class_name` inside diffusers only (or through `auto_map` remote code, which a "
    "bare save_pretrained folder has not); this package's classes are not part of diffusers"
)
COMPILE = "torch.compile in a subprocess; compilation is covered by tests/test_compile.py"


# ------------------------------------------------------------------------------------------------------------------
# SchedulerCommonTest


class TestEDMHeunSchedulerWithDiffusersMixin(mixins["schedulers"].SchedulerCommonTest):
    scheduler_classes = (EDMHeunScheduler,)
    forward_default_kwargs = (("num_inference_steps", 10),)

    def get_scheduler_config(self, **kwargs):
        return {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, **kwargs}

    test_trained_betas = not_applicable(NO_BETAS)
    test_add_noise_device = not_applicable(OFF_GRID)
    test_scheduler_public_api = not_applicable(OFF_GRID)


# ------------------------------------------------------------------------------------------------------------------
# ModelTesterMixin


class _ModelMixinCase(mixins["models"].ModelTesterMixin):
    suite_case = None

    @property
    def model_class(self):
        return self.suite_case.model_class

    @property
    def dummy_input(self):
        return self.suite_case.inputs()

    @property
    def input_shape(self):
        return tuple(next(iter(self.dummy_input.values())).shape[1:])

    @property
    def output_shape(self):
        return self.input_shape

    def prepare_init_args_and_inputs_for_common(self):
        return dict(self.suite_case.init), self.dummy_input

    def test_gradient_checkpointing_is_applied(self):
        # The mixin compares against the classes that hold a `gradient_checkpointing` flag, which each model test
        # passes (as diffusers' own transformer tests do); here only the top-level model holds it.
        super().test_gradient_checkpointing_is_applied(expected_set={self.model_class.__name__})

    test_set_attn_processor_for_determinism = not_applicable(NO_PROCESSORS)
    test_set_xformers_attn_processor_for_determinism = not_applicable(NO_PROCESSORS)
    # The parameterized LoRA tests (test_save_load_lora_adapter_*, test_lora_adapter_metadata_is_loaded_correctly_*)
    # skip themselves for a model without PeftAdapterMixin.
    test_lora_wrong_adapter_name_raises_error = not_applicable(NO_ADAPTERS)
    test_lora_adapter_wrong_metadata_raises_error = not_applicable(NO_ADAPTERS)
    test_auto_model = not_applicable(NOT_IN_DIFFUSERS)
    test_from_save_pretrained_dynamo = not_applicable(COMPILE)


class TestUViTWithDiffusersMixin(_ModelMixinCase, unittest.TestCase):
    suite_case = model_suite.UViTCase()
    main_input_name = "hidden_states"
    model_split_percents = [0.5, 0.7, 0.9]


class TestEDM2WithDiffusersMixin(_ModelMixinCase, unittest.TestCase):
    suite_case = model_suite.EDM2Case()
    main_input_name = "sample"


# ------------------------------------------------------------------------------------------------------------------
# PipelineTesterMixin


def required_optional_params():
    deprecated = {"callback", "callback_steps"}  # older mixins still list them; only callback_on_step_end exists
    return frozenset(mixins["pipelines"].PipelineTesterMixin.required_optional_params) - deprecated


class _PipelineMixinCase(mixins["pipelines"].PipelineTesterMixin):
    pipeline_class = ClassConditionalPipeline
    params = mixins["params"].CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS
    batch_params = mixins["params"].CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS
    required_optional_params = required_optional_params()
    test_attention_slicing = False  # no diffusers attention processors to slice
    test_xformers_attention = False
    suite_case = None

    def get_dummy_components(self):
        return self.suite_case.get_dummy_components()

    def get_dummy_inputs(self, device, seed=0):
        inputs = self.suite_case.get_dummy_inputs(seed)
        inputs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
        return inputs

    test_save_load_optional_components = not_applicable(
        "it sets every optional component to None, the pipeline's network included (transformer and unet are "
        "both optional because exactly one is given); checked without the network in tests/test_suite_pipeline.py"
    )
    test_encode_prompt_works_in_isolation = not_applicable("no prompts")
    test_save_load_dduf = not_applicable("diffusers 0.42 no longer loads pipelines from DDUF files")


class TestDiTPipelineWithDiffusersMixin(_PipelineMixinCase, unittest.TestCase):
    suite_case = pipeline_suite.TestDiTPipeline()


class TestUViTPipelineWithDiffusersMixin(_PipelineMixinCase, unittest.TestCase):
    suite_case = pipeline_suite.TestUViTPipeline()


class TestEDM2PipelineWithDiffusersMixin(_PipelineMixinCase, unittest.TestCase):
    suite_case = pipeline_suite.TestEDM2PipelineWithGuide()
