"""The training loop: a recipe in, checkpoints, sample grids, logs and an exported pipeline out.

Runs the same on one CPU and under ``accelerate launch`` on many GPUs. The data order is a pure function of
(seed, epoch, rank), and every random draw of the step comes from torch's global RNG, which accelerate saves with
each checkpoint: a resumed run continues exactly where the interrupted one stopped.

`Trainer` comes first and reads as the run goes: set-up, the loop, checkpoints, sample grids and export. The pieces
it is built from follow it: the data, the model and its optimizer, one optimizer step, and the launcher settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import SAFE_WEIGHTS_NAME, DistributedType, ProjectConfiguration, set_seed
from accelerate.utils.environment import str_to_bool
from diffusers.utils import make_image_grid
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data.batching import Batch
from ..data.latent_dataset import LatentNormalization
from ..distributed import check_world_size
from ..hub.pipeline_record import PipelineRecord, build_pipeline, export_recorded_pipeline, load_recorded_vae
from ..models import model_kind
from ..objectives import AuxiliaryLoss, DiffusionObjective
from .checkpoints import (
    CONFIG_NAME,
    NAMED_STATE_FILE,
    NamedState,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import MIXED_PRECISION, Config, ConfigError, config_to_dict, config_to_yaml, report_to_trackers
from .ema import SNAPSHOT_DIR_NAME, ConstantEMA, PowerFunctionEMA
from .lr_schedules import get_lr_scheduler
from .parts import build_noise_scheduler, build_objective
from .validation import check_environment, check_resume_config

logger = logging.getLogger(__name__)

# Edges of the log-SNR buckets in which the loss is also logged (ln SNR; 0 is SNR = 1).
LOG_SNR_EDGES = (-6.0, -3.0, 0.0, 3.0, 6.0)
LOG_SNR_BUCKETS = (
    [f"<{LOG_SNR_EDGES[0]:g}"]
    + [f"{lo:g}..{hi:g}" for lo, hi in zip(LOG_SNR_EDGES, LOG_SNR_EDGES[1:])]
    + [f">{LOG_SNR_EDGES[-1]:g}"]
)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


# --- the trainer -------------------------------------------------------------------------------------------------


class Trainer:
    """Trains one recipe. ``Trainer(config).train()`` returns the exported pipeline folder.

    Args:
        config: the recipe. Its ``train.mixed_precision`` and ``train.cpu``, when unset, come from the launcher
            (`apply_launcher_settings`); ``self.config`` holds the values used.
        trackers: experiment trackers of one's own (`accelerate.tracking.GeneralTracker` instances), used next to
            those that ``train.report_to`` names.
    """

    def __init__(self, config: Config, trackers: list[GeneralTracker] | tuple[GeneralTracker, ...] = ()):
        config = apply_launcher_settings(config)
        check_environment(config)
        self.config, self.output_dir = config, Path(config.train.output_dir)
        self.accelerator = self._start_accelerator(trackers)
        # The checkpoint a resume will load, compared with this config before any work.
        self.resume_from = resume_checkpoint(config)
        if self.resume_from is not None:
            check_resume_config(config, self.resume_from)
        self.micro_batch_size = self._micro_batch_size()
        if config.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        set_seed(config.train.seed)  # model initialisation, then the training stream (restored on resume)

        self.data = load_training_data(config, self.accelerator.device)
        self._check_dataset_size()
        self._build_model()
        snapshot_dir = str(self.output_dir / SNAPSHOT_DIR_NAME) if self.accelerator.is_main_process else None
        self.ema = build_ema(config, self.model, snapshot_dir)
        self._prepare_for_training()

        # Where the run stands; a checkpoint saves it (`_trainer_state`) and a resume restores it.
        self.step, self.epoch, self.batches_into_epoch, self.images_seen = 0, 0, 0, 0
        self.nonfinite = NonFiniteSteps(config.train.max_consecutive_nonfinite, self.accelerator.device)
        self.train_seconds = 0.0
        self.hardware = _hardware(self.accelerator)
        self.latest_grid = None
        self.pusher = None
        self.push_result = None

    # --- set-up --------------------------------------------------------------------------------------------------

    def _start_accelerator(self, trackers) -> Accelerator:
        train = self.config.train
        log_with = [*report_to_trackers(train.report_to), *trackers]
        accelerator = Accelerator(
            cpu=train.cpu,
            mixed_precision="no" if train.mixed_precision == "fp32" else train.mixed_precision,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            log_with=log_with or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir),
                logging_dir=str(self.output_dir / "logs"),
                automatic_checkpoint_naming=False,
            ),
        )
        check_world_size(accelerator.num_processes, "train/train.py", cpu_flag="train.cpu=true")
        logger.info(
            "process %d of %d (%s) on %s", accelerator.process_index, accelerator.num_processes,
            accelerator.distributed_type.value, accelerator.device,
        )  # fmt: skip
        if accelerator.distributed_type == DistributedType.FSDP:
            _check_fsdp(self.config)
        return accelerator

    def _micro_batch_size(self) -> int:
        """The batch of one process in one accumulation step: the global batch must split evenly into them."""
        train, processes = self.config.train, self.accelerator.num_processes
        world = processes * train.gradient_accumulation_steps
        if train.batch_size % world:
            raise ConfigError(
                f"train.batch_size: {train.batch_size} is not divisible by processes × accumulation steps = "
                f"{processes} × {train.gradient_accumulation_steps}."
            )
        return train.batch_size // world

    def _check_dataset_size(self) -> None:
        processes = self.accelerator.num_processes
        needed = self.micro_batch_size * processes
        if len(self.data.dataset) < needed:
            raise ConfigError(
                f"train.batch_size: {self.config.train.batch_size} (micro-batches of {self.micro_batch_size} on "
                f"{processes} process(es)) needs at least {needed} samples, but the dataset "
                f"({self._dataset_name()}) has {len(self.data.dataset)}."
            )

    def _build_model(self) -> None:
        """The model (fitted to the data), the noise schedule it is trained on, and the objective."""
        config, train = self.config, self.config.train
        self.model = build_model(config, self.data)
        if train.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        if train.attention == "xformers":
            self.model.enable_xformers_memory_efficient_attention()
        self.noise_scheduler = build_noise_scheduler(config.objective.schedule)
        self.objective = build_objective(config, self.noise_scheduler, self.data.num_classes)

    def _prepare_for_training(self) -> None:
        """Compile, hand the model and the optimizer to accelerate, and register what else checkpoints hold: the LR
        schedule and the EMA, each under its name (`NamedState`)."""
        config, accelerator = self.config, self.accelerator
        if config.train.compile:
            # In place rather than torch.compile(model): the parameter names, and so checkpoints, stay the same
            # with and without compilation, and a run can be resumed either way.
            self.model.compile()
        trainable = TrainingModule(self.model, self.objective, accelerator.process_index, accelerator.num_processes)
        optimizer = build_optimizer(config, trainable.parameters(), accelerator.device)
        self.module, self.optimizer = accelerator.prepare(trainable, optimizer)
        # Not passed through prepare: accelerate would step it once per process per step.
        self.lr_scheduler = build_lr_scheduler(config, optimizer)
        if self.ema is not None:
            self.ema.to(accelerator.device)
        # One registered object: accelerate numbers registered objects' files, and a part added later (an auxiliary
        # loss's state) is one more name here rather than a file that renumbers the others.
        self.named_state = NamedState(lr_scheduler=self.lr_scheduler, ema=self.ema)
        accelerator.register_for_checkpointing(self.named_state)

    # --- training ------------------------------------------------------------------------------------------------

    def train(self) -> Path | None:
        """Resume when asked, train to ``train.max_steps``, then write the last checkpoint, the final grid and the
        export (and push it when asked). Returns the exported folder on the main process."""
        config, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / CONFIG_NAME).write_text(config_to_yaml(config))
        self.resume()
        if accelerator.log_with:
            # TensorBoard drops what an interrupted run logged after the checkpoint resumed from, so the steps
            # written again are not there twice.
            init_kwargs = {"tensorboard": {"purge_step": self.step + 1}} if self.step else {}
            accelerator.init_trackers(
                config.train.tracker_project_name, config=_tracker_config(config), init_kwargs=init_kwargs
            )
        if config.hub.push_to_hub:
            from ..hub import BackgroundHubPusher

            # Uploads run on a background thread with retries: training never waits for or dies on a push.
            self.pusher = BackgroundHubPusher(
                config.hub.hub_model_id,
                enabled=accelerator.is_main_process,
                private=config.hub.private,
                max_retries=config.hub.max_retries,
                retry_delay=config.hub.retry_delay,
            )
        self.module.train()
        # Steps of the total, loss, img/s and the time left (main process); resumed runs start at their step.
        self.progress = tqdm(
            total=config.train.max_steps,
            initial=self.step,
            desc="Training",
            unit="step",
            dynamic_ncols=True,
            disable=not accelerator.is_main_process,
        )
        with self.progress, logging_redirect_tqdm():  # log lines print above the bar instead of through it
            self._loop()
        if self.nonfinite.allow_checkpoint(self.step):
            self.save_checkpoint()
        export_dir = self.finish()
        accelerator.end_training()
        return export_dir

    def _batches(self):
        """Micro-batches of indices forever, epoch after epoch, starting where the run left off."""
        accelerator = self.accelerator
        while True:
            for indices in self.data.dataset.index_batches(
                self.micro_batch_size,
                epoch=self.epoch,
                seed=self.config.train.seed,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
                start_step=self.batches_into_epoch,
            ):
                self.batches_into_epoch += 1
                yield indices
            self.epoch, self.batches_into_epoch = self.epoch + 1, 0

    def _loop(self) -> None:
        config, accelerator = self.config, self.accelerator
        train, device = config.train, accelerator.device
        batches, tracker = self._batches(), LossTracker(device)
        steps_since_log, last_log_time = 0, time.perf_counter()
        while self.step < train.max_steps:
            step_start = time.perf_counter()
            micro_batches = (self.data.batch(next(batches), device) for _ in range(train.gradient_accumulation_steps))
            grad_norm, skipped = optimizer_step(
                accelerator, self.module, self.optimizer, micro_batches, config.optim.max_grad_norm, tracker
            )
            self.nonfinite.record(skipped)
            self.lr_scheduler.step()  # also on a skipped step: the schedule follows the step count, as with fp16
            self.step += 1
            self.images_seen += train.batch_size
            if self.ema is not None:
                self.ema.update(self.model, self.step, nimg=self.images_seen)
            self.train_seconds += time.perf_counter() - step_start
            steps_since_log += 1
            self.progress.update()

            if self.step % train.log_every == 0 or self.step == train.max_steps:
                now = time.perf_counter()
                self.nonfinite.check(steps_since_log, self.step, self.output_dir)
                self._log(tracker, grad_norm, steps_since_log, now - last_log_time)
                tracker.reset()
                steps_since_log, last_log_time = 0, now
            if train.sample_every and self.step % train.sample_every == 0 and self.step != train.max_steps:
                self.sample_grid()
            if train.checkpoint_every and self.step % train.checkpoint_every == 0 and self.step != train.max_steps:
                if self.nonfinite.allow_checkpoint(self.step):
                    self._checkpoint_and_maybe_export()

    def _log(self, tracker: LossTracker, grad_norm, steps, seconds) -> None:
        accelerator = self.accelerator
        loss = accelerator.reduce(tracker.loss, reduction="mean").item() / steps
        bucket_sum = accelerator.reduce(tracker.bucket_sum, reduction="sum")
        bucket_count = accelerator.reduce(tracker.bucket_count, reduction="sum")
        values = {
            "train/loss": loss,
            "train/grad_norm": float(grad_norm),
            "train/lr": self.lr_scheduler.get_last_lr()[0],
            "train/images_per_second": steps * self.config.train.batch_size / max(seconds, 1e-9),
            "train/epoch": self.epoch,
        }
        if tracker.vb is not None:
            values["train/vb"] = accelerator.reduce(tracker.vb, reduction="mean").item() / steps
        for name, total in tracker.terms.items():
            values[f"train/{name}"] = accelerator.reduce(total, reduction="mean").item() / steps
        for label, total, count in zip(LOG_SNR_BUCKETS, bucket_sum.tolist(), bucket_count.tolist()):
            if count:
                values[f"loss_by_log_snr/{label}"] = total / count
        if accelerator.log_with:
            accelerator.log(values, step=self.step)
        self.progress.set_postfix(
            loss=f"{loss:.4f}", img_per_s=f"{values['train/images_per_second']:.1f}", refresh=False
        )
        if accelerator.is_main_process:
            logger.info(
                "step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.1f img/s",
                self.step,
                self.config.train.max_steps,
                loss,
                values["train/grad_norm"],
                values["train/lr"],
                values["train/images_per_second"],
            )

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def _trainer_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_into_epoch": self.batches_into_epoch,
            "images_seen": self.images_seen,
            "nonfinite_in_a_row": self.nonfinite.current_run(),
            "train_seconds": self.train_seconds,
            "hardware": self.hardware,
            "world_size": self.accelerator.num_processes,
        }

    def save_checkpoint(self) -> Path:
        def write_config_and_record(folder: Path) -> None:
            (folder / CONFIG_NAME).write_text(config_to_yaml(self.config))
            self.pipeline_record().save(folder)  # what exporting this checkpoint needs, data and trainer aside

        path = save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.step,
            self._trainer_state(),
            save_fn=write_config_and_record,
            total_limit=self.config.train.checkpoints_total_limit,
            named_state=self.named_state,
        )
        # Without periodic snapshots, each checkpoint is a point that post-hoc EMA can reconstruct from.
        ema = self.ema
        if isinstance(ema, PowerFunctionEMA) and ema.snapshot_every is None and ema.snapshot_dir is not None:
            ema.save_snapshot()
        return path

    def resume(self) -> None:
        """Load the checkpoint ``train.resume`` names, if any, and continue from its step."""
        if self.config.train.resume is None:
            return
        path = resume_checkpoint(self.config, clean=self.accelerator.is_main_process)
        if path is None:
            logger.warning(
                "train.resume=latest: no checkpoint in %s, so this run STARTS FROM SCRATCH (step 0).", self.output_dir
            )
            return
        if self.resume_from is not None and path.resolve() != self.resume_from.resolve():
            check_resume_config(self.config, path)  # a newer checkpoint appeared since the start-up check
        state = load_checkpoint(self.accelerator, path, self.named_state)
        self.step = int(state["step"])
        for key in ("epoch", "batches_into_epoch", "images_seen"):
            setattr(self, key, int(state[key]))
        self.nonfinite.restore(int(state["nonfinite_in_a_row"]))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        trained_on = state.get("hardware")
        if trained_on and trained_on != self.hardware:
            self.hardware = f"{trained_on}, then {self.hardware}"
        logger.info("Resumed from %s at step %d.", path, self.step)

    def _checkpoint_and_maybe_export(self) -> None:
        path = self.save_checkpoint()
        push = self.pusher is not None and self.config.hub.push_checkpoints
        if self.config.train.export_every_checkpoint or push:
            export_dir = self.export(path / "pipeline")
            if push and export_dir is not None:
                self.pusher.submit(export_dir, commit_message=f"Checkpoint at step {self.step}")

    # --- sampling and export -------------------------------------------------------------------------------------

    @cached_property
    def vae(self):
        """The VAE that decodes sampled latents (None for pixel data), loaded once, for the first grid or export.

        Its config carries the training normalisation, so a pipeline around it decodes what the model learned.
        """
        record = self._vae_record()
        return None if record is None else load_recorded_vae(record).to(self.accelerator.device)

    def _vae_record(self) -> dict | None:
        """Where the VAE comes from and the latent normalisation trained with (None for pixel data)."""
        if not self.data.is_latent:
            return None
        metadata = self.data.dataset.metadata
        return {
            "id": metadata["vae_id"],
            "revision": metadata.get("vae_revision"),
            "subfolder": metadata.get("vae_subfolder"),
            "config": self.data.dataset.normalization.vae_config(),
        }

    def _inference_model(self) -> nn.Module:
        """The weights that sample and are exported: the EMA's when there is one, else the live model's."""
        return self.ema.model if self.ema is not None else self.model

    def pipeline_record(self) -> PipelineRecord:
        """What a pipeline of this run needs besides its weights, as of this step. Each checkpoint saves it, and
        `hub.export_checkpoint` exports the checkpoint from it without the data or a trainer."""
        model = self._inference_model()
        if self.ema is not None:  # its entry in the named state
            weights = {"file": NAMED_STATE_FILE, "keys": ["ema", *self.ema.MODEL_STATE_KEYS]}
        else:  # the live model, saved by accelerate as the TrainingModule's `model`
            weights = {"file": SAFE_WEIGHTS_NAME, "prefix": "model."}
        return PipelineRecord(
            model=json.loads(model.to_json_string()),
            slot=model_kind(self.config.model.kind).pipeline_slot,
            weights=weights,
            class_names=list(self.data.class_names),
            sample_shape=list(self.data.sample_shape),
            scheduler=json.loads(build_sampling_scheduler(self.config, self.noise_scheduler).to_json_string()),
            vae=self._vae_record(),
            card=self._card_facts(),
            sample_grid=self._grid_path(self.step).relative_to(self.output_dir).as_posix(),
        )

    def _card_facts(self) -> dict:
        """The model card's facts about this run as of this step (`hub.ModelCardInfo` fields)."""
        config, sampling = self.config, self.config.sampling
        return {
            "model_name": config.hub.hub_model_id.split("/")[-1] if config.hub.hub_model_id else self.output_dir.name,
            "repo_id": config.hub.hub_model_id,
            "dataset_name": self._dataset_name(),
            "datasets": self._hub_datasets(),
            "training_steps": self.step,
            "images_seen": self.images_seen,
            "batch_size": config.train.batch_size,
            "hardware": self.hardware,
            "training_time": f"{self.train_seconds / 60:.1f} minutes",
            "num_inference_steps": sampling.num_inference_steps,
            "guidance_scale": sampling.guidance_scale,
            "guidance_interval": list(sampling.guidance_interval) if sampling.guidance_interval else None,
        }

    def pipeline(self):
        """A pipeline around the inference weights (`_inference_model`; put them in eval mode first and back in
        train mode after), built from this step's record as an export of the checkpoint builds it."""
        return build_pipeline(self.pipeline_record(), self._inference_model(), self.vae)

    def _grid_path(self, step: int) -> Path:
        return self.output_dir / "samples" / f"step_{step:07d}.png"

    def sample_grid(self):
        """Sample a grid (classes along columns) from the inference weights; save it as PNG and log it."""
        accelerator, sampling = self.accelerator, self.config.sampling
        grid = None
        if accelerator.is_main_process:
            self.module.eval()
            pipeline = self.pipeline()
            pipeline.set_progress_bar_config(disable=True)  # the training bar is the one progress bar
            classes = list(range(min(self.data.num_classes, sampling.max_classes)))
            labels = [c for _ in range(sampling.images_per_class) for c in classes]
            interval = tuple(sampling.guidance_interval) if sampling.guidance_interval else None
            images = pipeline(
                labels,
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                guidance_interval=interval,
                generator=torch.Generator(accelerator.device).manual_seed(self.config.train.seed),
                output_type="pil",
            ).images
            grid = make_image_grid(images, rows=sampling.images_per_class, cols=len(classes))
            path = self._grid_path(self.step)
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            log_image_to_trackers(accelerator, "samples", grid, self.step)
            self.latest_grid = grid
            self.module.train()
        accelerator.wait_for_everyone()
        return grid

    def export(self, folder: Path) -> Path | None:
        """Export the inference weights as a pipeline folder with a model card (main process), as
        `hub.export_checkpoint` exports a checkpoint of this step."""
        accelerator = self.accelerator
        export_dir = None
        if accelerator.is_main_process:
            self.module.eval()
            export_dir = export_recorded_pipeline(
                self.pipeline_record(),
                self._inference_model(),
                self.vae,
                folder,
                training_config=config_to_dict(self.config),
                sample_grid=self.latest_grid,
            )
            self.module.train()
        accelerator.wait_for_everyone()
        return export_dir

    def _hub_datasets(self) -> list[str]:
        """The Hub dataset the training data came from (for the card's ``datasets``), if it came from the Hub:
        the recipe's ``data.path`` or, for cached latents, the dataset the cache was made from."""
        from ..hub.model_card import hub_repo_id

        data = self.config.data
        name = data.path if data.kind == "hf_dataset" else None
        if self.data.is_latent:
            source = self.data.dataset.metadata.get("source") or {}
            name = source.get("name") if source.get("kind") == "dataset" else None
        repo_id = hub_repo_id(name)
        return [repo_id] if repo_id else []

    def _dataset_name(self) -> str:
        data = self.config.data
        what = f"built-in {data.name}" if data.kind == "builtin" else str(data.path)
        return (
            f"{what} ({'latents' if self.data.is_latent else 'pixels'}, {'×'.join(map(str, self.data.sample_shape))})"
        )

    def finish(self) -> Path | None:
        """The final sample grid and export, and the final push when asked for (its outcome in ``push_result``)."""
        self.sample_grid()
        export_dir = self.export(self.output_dir / "pipeline")
        if self.pusher is None:
            return export_dir
        if export_dir is not None:
            self.pusher.submit(export_dir, commit_message=f"Final model after {self.step} steps")
        result, repo_id = self.pusher.close(), self.config.hub.hub_model_id
        self.push_result = result
        if result is not None and not result.ok:
            again = f"diffusers-speedup export {export_dir} --output_dir {export_dir}-hub --push_to_hub"
            logger.error(
                "The final push to %s failed after %d attempts: %s. The exported folder %s is intact; push it later "
                "with `%s --hub_model_id %s`.",
                repo_id,
                result.attempts,
                result.error,
                export_dir,
                again,
                repo_id,
            )
        elif result is not None:
            logger.info("Pushed %s to %s", export_dir, result.commit_url)
        return export_dir


def train(config: Config) -> Path | None:
    """Train a recipe end to end and return the exported pipeline folder (on the main process)."""
    return Trainer(config).train()


def resume_checkpoint(config: Config, clean: bool = False) -> Path | None:
    """The checkpoint ``train.resume`` names (``latest``: the newest complete one in ``train.output_dir``), or None
    for a fresh run. ``clean``: also remove the leftovers of interrupted saves (the main process does so when the
    run resumes; the start-up check only reads)."""
    resume = config.train.resume
    if resume is None:
        return None
    if resume == "latest":
        return find_latest_checkpoint(config.train.output_dir, clean=clean)
    return Path(resume)


# --- data --------------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """Pixels held in memory (PixelDataset) or cached latents (LatentDataset) behind one interface."""

    dataset: object
    is_latent: bool
    class_names: list[str]
    sample_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def batch(self, indices: torch.Tensor, device) -> Batch:
        return self.dataset.batch(indices, device)


def load_training_data(config: Config, device) -> TrainingData:
    from ..data import LatentDataset, load_pixel_dataset

    data = config.data
    if data.kind == "latents":
        dataset = LatentDataset(data.path, random_flip=data.random_flip, in_memory=data.in_memory, device=device)
        if data.latent_norm == "per_channel":
            dataset.normalization = per_channel_normalization(dataset, data)
        names = dataset.class_names or [str(i) for i in range(dataset.num_classes)]
        return TrainingData(dataset, True, list(names), dataset.latent_shape)
    source = data.name if data.kind == "builtin" else data.path
    try:
        dataset = load_pixel_dataset(
            source,
            resolution=data.resolution,
            channels=data.channels,
            random_flip=data.random_flip,
            image_column=data.image_column,
            label_column=data.label_column,
        )
    except (OSError, ValueError) as error:  # datasets' own errors name neither the key nor, often, the path
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"data.path: cannot read {source!r} as {data.kind}: {first_line}") from None
    if data.in_memory:
        dataset = dataset.to(device)
    if dataset.rejected:
        logger.warning("%d images were rejected, e.g. %s", len(dataset.rejected), dataset.rejected[:3])
    names = dataset.class_names or [str(i) for i in range(int(dataset.labels.max()) + 1)]
    return TrainingData(dataset, False, list(names), dataset.sample_shape)


def per_channel_normalization(dataset, data) -> LatentNormalization:
    """EDM2-style normalisation: the configured raw statistics, or the cache's own, mapped to latent_target_std."""
    channels = dataset.latent_shape[0]
    if data.latents_mean is not None:
        if len(data.latents_mean) != channels:
            raise ConfigError(
                f"data.latents_mean: {len(data.latents_mean)} values, but the latents in {data.path} have "
                f"{channels} channels."
            )
        mean, std = list(data.latents_mean), list(data.latents_std)
    else:
        mean, std = dataset.latent_statistics()
        if min(std) <= 0:
            raise ConfigError(f"data.latent_norm: a channel of the latents in {data.path} is constant (std {std}).")
    normalization = LatentNormalization.per_channel(mean, std, data.latent_target_std)
    logger.info(
        "latents normalised per channel to std %g: mean %s, std %s",
        data.latent_target_std,
        [round(v, 4) for v in mean],
        [round(v, 4) for v in std],
    )
    return normalization


# --- model, objective, EMA, optimizer, schedules -----------------------------------------------------------------


def build_model(config: Config, data: TrainingData) -> nn.Module:
    """The recipe's model, with sample size, channels and classes filled in from the data unless given."""
    kind = model_kind(config.model.kind)
    if config.model.pretrained:
        return kind.model_class.from_pretrained(config.model.pretrained)
    fitted = kind.fitted_params(data.sample_shape, data.num_classes, config.objective.learned_variance)
    params = {**fitted, **config.model.params}
    if config.model.preset is None:
        return kind.model_class(**params)
    return kind.model_class.from_preset(config.model.preset, **params)


def build_ema(config: Config, model: nn.Module, snapshot_dir: str | None) -> ConstantEMA | PowerFunctionEMA | None:
    """The recipe's EMA of ``model``, or None. ``snapshot_dir``: where the power-function EMA writes its snapshots
    (None on all but the main process, which keep the same averages without writing)."""
    ema = config.ema
    if ema.kind == "constant":
        return ConstantEMA(model, decay=ema.decay, start_step=ema.start_step)
    if ema.kind == "power":
        return PowerFunctionEMA(
            model, sigma_rels=ema.sigma_rels, snapshot_dir=snapshot_dir, snapshot_every=ema.snapshot_every or None
        )
    return None


def build_optimizer(config: Config, parameters, device: torch.device) -> torch.optim.Optimizer:
    optim = config.optim
    cls = torch.optim.AdamW if optim.optimizer == "adamw" else torch.optim.Adam
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    if device.type in ("cuda", "cpu"):
        # One kernel for the whole update instead of several per tensor, and it can skip a non-finite step on the
        # device (see _step_unless).
        kwargs["fused"] = True
    return cls(parameters, **kwargs)


def build_lr_scheduler(config: Config, optimizer: torch.optim.Optimizer):
    """The recipe's learning-rate schedule, stepped once per optimizer step."""
    optim = config.optim
    batch_dependent = {}
    if optim.lr_schedule == "inverse_sqrt":  # EDM2's: its warm-up is counted in images, so it needs the batch
        batch_dependent = {
            "ref_batches": optim.ref_batches,
            "rampup_images": optim.rampup_images,
            "batch_size": config.train.batch_size,
        }
    return get_lr_scheduler(
        optim.lr_schedule,
        optimizer,
        warmup_steps=optim.warmup_steps,
        total_steps=config.train.max_steps,
        **batch_dependent,
    )


def build_sampling_scheduler(config: Config, noise_scheduler):
    """The scheduler that sample grids and the exported pipeline use."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EDMEulerScheduler

    from ..schedulers.scheduling_edm_heun import EDMHeunScheduler

    schedule, prediction_type = config.objective.schedule, config.objective.prediction_type
    name = config.sampling.scheduler or ("edm_heun" if schedule.kind == "edm" else "ddim")
    if schedule.kind == "edm":
        cls = {"edm_heun": EDMHeunScheduler, "edm_euler": EDMEulerScheduler}[name]
        kwargs = {
            "sigma_min": schedule.sigma_min,
            "sigma_max": schedule.sigma_max,
            "sigma_data": schedule.sigma_data,
            "prediction_type": prediction_type,
        }
        return cls(**kwargs)
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm_solver": DPMSolverMultistepScheduler}[name]
    extra = {"timestep_spacing": "trailing"} if schedule.rescale_betas_zero_snr else {}
    if name == "ddpm":  # DDPM samples with a learned variance (DiT's sampler); the others use the mean alone
        extra["variance_type"] = "learned_range" if config.objective.learned_variance else "fixed_small"
        if config.objective.learned_variance:  # DiT's sample_ddp.py: x0 unclipped, steps evenly spread over 0..T-1
            extra["clip_sample"] = False
            extra.setdefault("timestep_spacing", "linspace")
    return cls.from_config(noise_scheduler.config, prediction_type=prediction_type, **extra)


# --- one optimizer step ------------------------------------------------------------------------------------------


class TrainingModule(nn.Module):
    """The model, the objective and the auxiliary losses as one module, so that DDP also averages the objective's
    own parameters (EDM2's uncertainty head) and the auxiliary losses' (REPA's projector), checkpoints hold them
    all, and a single forward returns the per-sample losses. The exported pipeline takes ``model`` alone."""

    def __init__(
        self,
        model: nn.Module,
        objective: DiffusionObjective,
        rank: int = 0,
        world_size: int = 1,
        auxiliary_losses: list[AuxiliaryLoss] | tuple[AuxiliaryLoss, ...] = (),
    ):
        super().__init__()
        self.model, self.objective = model, objective
        self.shard = (rank, world_size)
        self.auxiliary_losses = nn.ModuleList(auxiliary_losses)

    def forward(self, x0: torch.Tensor, class_labels: torch.Tensor, **extras: torch.Tensor):
        # Every process draws the noise of the whole global batch and keeps its slice: N processes train on exactly
        # what one process would, and no two processes reuse the same noise.
        output = self.objective(self.model, x0, class_labels, shard=self.shard)
        for auxiliary in self.auxiliary_losses:  # each reads the hidden state that the objective's forward made
            term = auxiliary(**extras)
            output.loss = output.loss + term
            output.terms[auxiliary.name] = term.detach()
        return output


class LossTracker:
    """Running sums of the loss, overall and per log-SNR bucket, kept on the device: reading them (one host sync)
    happens only when they are logged."""

    def __init__(self, device):
        self.edges = torch.tensor(LOG_SNR_EDGES, device=device)
        self.loss = torch.zeros((), device=device)
        self.bucket_sum = torch.zeros(len(LOG_SNR_EDGES) + 1, device=device)
        self.bucket_count = torch.zeros(len(LOG_SNR_EDGES) + 1, device=device)
        self.vb = None  # the variational-bound part of the loss, for learned-variance models
        self.terms = {}  # the auxiliary losses' terms, by name

    def add(self, output, weight: float = 1.0) -> None:
        per_sample = output.loss.detach()
        self.loss += per_sample.mean() * weight
        if output.vb is not None:
            self.vb = (0 if self.vb is None else self.vb) + output.vb.detach().mean() * weight
        for name, term in output.terms.items():
            self.terms[name] = self.terms.get(name, 0) + term.mean() * weight
        buckets = torch.bucketize(output.snr.clamp_min(1e-20).log(), self.edges)
        self.bucket_sum.index_add_(0, buckets, per_sample)
        self.bucket_count.index_add_(0, buckets, torch.ones_like(per_sample))

    def reset(self) -> None:
        for total in (self.loss, self.bucket_sum, self.bucket_count):
            total.zero_()
        self.vb = None
        self.terms = {}


class NonFiniteSteps:
    """The optimizer steps skipped for a non-finite gradient, counted on the device (no host read per step) and
    read only when the loss is logged (`check`) and at checkpoints (`allow_checkpoint`).

    Args:
        max_in_a_row: ``train.max_consecutive_nonfinite``: the run stops once this many steps in a row were skipped.
        device: where the counts live.
    """

    def __init__(self, max_in_a_row: int, device):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)  # the latest steps, all skipped
        self.longest_run = self.in_a_row.clone()  # the longest run of skipped steps since the last log
        self.since_log = self.in_a_row.clone()  # steps skipped since the last log

    def restore(self, in_a_row: int) -> None:
        """Continue from a checkpoint whose latest ``in_a_row`` steps were skipped."""
        self.in_a_row.fill_(in_a_row)
        self.longest_run.fill_(in_a_row)

    def record(self, skipped: torch.Tensor) -> None:
        """Count one optimizer step; ``skipped`` is the 0-dim bool tensor that `optimizer_step` returns."""
        self.in_a_row = (self.in_a_row + 1) * skipped
        self.longest_run = torch.maximum(self.longest_run, self.in_a_row)
        self.since_log += skipped

    def current_run(self) -> int:
        return int(self.in_a_row)

    def allow_checkpoint(self, step: int) -> bool:
        """False, with a warning, while the latest steps were skipped: a checkpoint written then would be named as
        the last good one although the run had already gone wrong."""
        in_a_row = self.current_run()
        if in_a_row:
            logger.warning(
                "No checkpoint at step %d: the last %d optimizer steps were non-finite and skipped.", step, in_a_row
            )
        return not in_a_row

    def check(self, steps: int, step: int, output_dir: Path) -> None:
        """At a log: warn about the steps skipped among the last ``steps``, raise `NonFiniteLossError` once too many
        came in a row, and start counting for the next log."""
        skipped, longest_run = int(self.since_log), int(self.longest_run)
        self.since_log.zero_()
        self.longest_run.copy_(self.in_a_row)
        if not skipped:
            return
        logger.warning(
            "%d of the last %d optimizer steps (up to step %d) had a non-finite gradient norm and were skipped.",
            skipped,
            steps,
            step,
        )
        if longest_run >= self.max_in_a_row:
            last = find_latest_checkpoint(output_dir, clean=False)
            raise NonFiniteLossError(
                f"{longest_run} optimizer steps in a row had a non-finite loss or gradient (seen at step {step}; "
                f"train.max_consecutive_nonfinite is {self.max_in_a_row}); stopping. "
                f"The last good checkpoint is {last or 'none (none saved)'}."
            )


def optimizer_step(
    accelerator, module, optimizer, micro_batches, max_grad_norm: float | None, tracker: LossTracker | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``micro_batches`` (an iterable of `Batch`, one per accumulation step, read lazily):
    forward and backward each, clip, and step unless the gradient is not finite.

    Returns the gradient norm and a 0-dim bool tensor telling whether the step was skipped, both left on the device:
    with a fused optimizer (the default) nothing here waits for the GPU.
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    grad_norm, skipped = torch.zeros(()), torch.zeros((), dtype=torch.bool)
    for x0, class_labels, extras in micro_batches:
        with accelerator.accumulate(module):
            output = module(x0, class_labels, **extras)
            accelerator.backward(output.loss.mean())
            if accelerator.sync_gradients:
                # With no clipping asked for, an infinite bound still returns the norm (for logging and the check).
                grad_norm = accelerator.clip_grad_norm_(
                    parameters, math.inf if max_grad_norm is None else max_grad_norm
                )
                grad_norm = torch.as_tensor(grad_norm)
                skipped = ~torch.isfinite(grad_norm)
                if accelerator.scaler is not None:
                    optimizer.step()  # fp16's loss scaler skips non-finite steps itself
                else:
                    _step_unless(optimizer, skipped)
                optimizer.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.add(output, weight=1.0 / accelerator.gradient_accumulation_steps)
    return grad_norm, skipped


def _step_unless(optimizer, skip: torch.Tensor) -> None:
    """Step unless ``skip`` (a 0-dim bool tensor) is set, deciding on the device when the optimizer is fused.

    Fused Adam/AdamW read a ``found_inf`` flag inside their kernel (the hook GradScaler uses) and then leave the
    parameters, moments and step count untouched, so the skip costs no host read. Other optimizers need the
    decision on the host: one scalar read per step.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
    if all(group.get("fused") for group in inner.param_groups):
        inner.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(skip):
        optimizer.step()


# --- launcher, hardware, trackers --------------------------------------------------------------------------------

# accelerate's spelling of a precision -> the recipe's.
_LAUNCHER_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp8"}


def apply_launcher_settings(config: Config) -> Config:
    """The recipe with ``train.mixed_precision`` and ``train.cpu`` taken from the launcher where it leaves them unset.

    ``accelerate launch`` hands its flags, or the ``accelerate config`` defaults, to the processes it starts as
    ACCELERATE_MIXED_PRECISION and ACCELERATE_USE_CPU. A value in the recipe wins over the launcher's, as the
    ``--mixed_precision`` argument of diffusers' example scripts does, with a warning naming both when they differ.
    Without a launcher and a recipe value: fp32, and the GPU when there is one.
    """
    train = config.train
    launcher_env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    launcher_precision = None if launcher_env is None else _LAUNCHER_PRECISION.get(launcher_env.lower(), launcher_env)
    mixed_precision = train.mixed_precision
    if mixed_precision is None:
        mixed_precision = launcher_precision or "fp32"
        if mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"train.mixed_precision: the launcher asks for {launcher_env!r} (ACCELERATE_MIXED_PRECISION), which "
                f"this trainer does not support; launch with one of no, bf16, fp16, or set it in the recipe."
            )
    elif launcher_precision is not None and launcher_precision != mixed_precision:
        logger.warning(
            "train.mixed_precision is %r in the recipe but the launcher (accelerate launch --mixed_precision, or "
            "accelerate config) asks for %r; training in %r as the recipe says. Leave train.mixed_precision unset "
            "to follow the launcher.",
            mixed_precision,
            launcher_precision,
            mixed_precision,
        )

    # accelerate always sets ACCELERATE_USE_CPU ("False" unless --cpu), so only an asked-for CPU can contradict.
    launcher_cpu = str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")) == 1
    cpu = train.cpu
    if cpu is None:
        cpu = launcher_cpu
    elif launcher_cpu and not cpu:
        logger.warning(
            "train.cpu is false in the recipe but the launcher (accelerate launch --cpu, or accelerate config) asks "
            "for the CPU; training on the accelerator as the recipe says. Leave train.cpu unset to follow the "
            "launcher."
        )
        # accelerate reads the variable again and would force the CPU; the recipe's choice is final here.
        os.environ["ACCELERATE_USE_CPU"] = "false"
    return dataclasses.replace(config, train=dataclasses.replace(train, mixed_precision=mixed_precision, cpu=cpu))


def _check_fsdp(config: Config) -> None:
    """FSDP leaves each process a shard of every parameter; these features need each weight whole."""
    if config.ema.kind != "none":
        raise ConfigError(
            "ema.kind: the EMA averages whole parameters, which FSDP shards; train with DDP or set ema.kind=none."
        )
    refused = model_kind(config.model.kind).fsdp_refused
    if refused:
        raise ConfigError(f"model.kind: {refused}.")


def _hardware(accelerator: Accelerator) -> str:
    count = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{count}× {torch.cuda.get_device_name(accelerator.device)}"
    return f"{count}× CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _tracker_config(config: Config) -> dict:
    """Flat scalar hyper-parameters, which TensorBoard's hparams view accepts."""
    flat = {}

    def visit(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                visit(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", config_to_dict(config))
    return flat


def log_image_to_trackers(accelerator: Accelerator, name: str, image, step: int) -> None:
    """Log one PIL image to every tracker of `accelerator` that takes images, in the form each one's
    ``log_images`` expects (trackers without it, such as MLflow's in accelerate, are skipped)."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if not callable(getattr(tracker, "log_images", None)):
            continue
        if tracker.name == "tensorboard":
            tracker.log_images({name: pixels[None]}, step=step, dataformats="NHWC")
        elif tracker.name in ("aim", "clearml"):
            tracker.log_images({name: pixels}, step=step)
        else:  # W&B, SwanLab and trackers of one's own: a list of images per key
            tracker.log_images({name: [pixels]}, step=step)
