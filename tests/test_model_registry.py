"""The model registry: one entry per model kind, and every part of the package that needs a kind reads it."""

import inspect
import typing

import pytest
import torch

import diffusers_speedup
from diffusers_speedup.hub.model_card import TECHNIQUES, detect_techniques
from diffusers_speedup.models import MODEL_KINDS, model_kind, model_kind_of
from diffusers_speedup.objectives.objective import CONDITIONINGS
from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline
from diffusers_speedup.training.config import ConfigError, ModelConfig
from diffusers_speedup.training.parts import build_model
from diffusers_speedup.training.recipes import load_config
from diffusers_speedup.training.training_data import TrainingData


@pytest.fixture(params=sorted(MODEL_KINDS))
def kind(request):
    return MODEL_KINDS[request.param]


def test_the_recipe_schema_offers_exactly_the_registered_kinds():
    annotation = typing.get_type_hints(ModelConfig)["kind"]
    assert set(typing.get_args(annotation)) == set(MODEL_KINDS)
    with pytest.raises(ValueError, match="model.kind: 'unet2d' is not one of uvit"):
        model_kind("unet2d")


def test_each_entry_is_consistent(kind):
    cls = kind.model_class
    # The root exports the class: installed-class loading of exported folders needs it.
    assert getattr(diffusers_speedup, cls.__name__) is cls
    assert kind.conditioning in CONDITIONINGS
    assert kind.pipeline_slot in inspect.signature(ClassConditionalPipeline.__init__).parameters
    # The shipped pipeline cannot read this registry; a σ-called class says so itself (the guide check reads it).
    assert bool(getattr(cls, "input_is_sigma", False)) == (kind.conditioning == "sigma")
    assert kind.card_tag is None or kind.card_tag in TECHNIQUES
    accepted = set(inspect.signature(cls.__init__).parameters)
    assert set(kind.fitted_params((4, 8, 8), 10, learned_variance=kind.learned_variance)) <= accepted
    assert model_kind_of(cls) is kind
    for preset in kind.presets:
        with torch.device("meta"):
            assert isinstance(cls.from_preset(preset), cls)


def test_the_trainer_builds_each_kind_from_its_entry_fitted_to_the_data(kind, tmp_path):
    overrides = [f"model.kind={kind.name}", f"train.output_dir={tmp_path}", "objective.label_dropout=0"]
    if kind.conditioning == "sigma":
        overrides += ["objective.schedule.kind=edm", "objective.prediction_type=sample"]
    config = load_config(None, overrides)
    data = TrainingData(dataset=None, is_latent=False, class_names=["a", "b", "c"], sample_shape=(3, 16, 16))
    with torch.device("meta"):
        model = build_model(config, data)
    assert type(model) is kind.model_class
    assert (model.config.sample_size, model.config.in_channels, model.config.num_classes) == (16, 3, 3)


def test_model_rules_come_from_the_entries(tmp_path):
    with pytest.raises(ConfigError, match="objective.learned_variance: needs model.kind 'dit'"):
        load_config(None, [f"train.output_dir={tmp_path}", "objective.learned_variance=true"])
    with pytest.raises(ConfigError, match="objective.label_dropout: DiTModel drops labels itself"):
        load_config(None, [f"train.output_dir={tmp_path}", "model.kind=dit", "objective.label_dropout=0.1"])


def test_the_card_tag_comes_from_the_entry():
    assert detect_techniques({"model": {"kind": "edm2_unet"}}) == ["edm2"]
    assert detect_techniques({"model": {"kind": "dit"}}) == []
    assert detect_techniques({}, ["UViTModel"]) == ["u-vit"]
