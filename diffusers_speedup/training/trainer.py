"""The training loop: a recipe in, checkpoints, sample grids, logs and an exported pipeline out.

Runs the same on one CPU and under ``accelerate launch`` on many GPUs. The data order is a pure function of
(seed, epoch, rank), and every random draw of the step comes from torch's global RNG, which accelerate saves with
each checkpoint: a resumed run continues exactly where the interrupted one stopped.

`Trainer` reads as the run goes: set-up, the loop, checkpoints, sample grids and export. The pieces it is built from
live beside it, one concept a file: the launch (`launch.py`), the data (`training_data.py`), the model, objective,
EMA, optimizer and schedules (`parts.py`), one optimizer step (`step.py`), checkpoints (`checkpoints.py`), the
trackers (`trackers.py`) and the stop on SIGTERM (`preemption.py`).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from functools import cached_property
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import SAFE_WEIGHTS_NAME, ProjectConfiguration, set_seed
from diffusers.utils import make_image_grid
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..distributed import check_world_size
from ..hub.pipeline_record import PipelineRecord, build_pipeline, export_recorded_pipeline, load_recorded_vae
from ..models import model_kind
from ..run_folder import checkpoint_step, clean_incomplete_checkpoints, find_latest_checkpoint, list_checkpoints
from .checkpoints import (
    CONFIG_NAME,
    NAMED_STATE_FILE,
    DamagedCheckpointError,
    NamedState,
    checkpoint_damage,
    checkpoint_name,
    explain_failed_write,
    load_checkpoint,
    save_checkpoint,
)
from .config import Config, config_to_dict, config_to_yaml, report_to_trackers
from .ema import SNAPSHOT_DIR_NAME, PowerFunctionEMA
from .launch import apply_launcher_settings, check_job, claim_output_dir, hardware_name
from .parts import (
    build_auxiliary_losses,
    build_ema,
    build_lr_scheduler,
    build_model,
    build_noise_scheduler,
    build_objective,
    build_optimizer,
    build_sampling_scheduler,
)
from .preemption import SigtermFlag, TrainingPreempted
from .step import LOG_SNR_BUCKETS, LossTracker, NonFiniteSteps, TrainingModule, optimizer_step
from .trackers import log_image_to_trackers, tracker_config
from .training_data import load_training_data, with_data_resolution
from .validation import check_environment, check_repa_fits, check_resume_config, check_resume_data

logger = logging.getLogger(__name__)


# --- the trainer -------------------------------------------------------------------------------------------------


def _gives_up_the_output_dir_on_error(init):
    """A Trainer that fails to set up releases its output folder (removing it when it made it and left it empty)."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if getattr(self, "run_lock", None) is not None:
                self.run_lock.release(remove_created_folder=True)
            raise

    return wrapper


def _gives_up_the_output_dir_at_the_end(train):
    """The run owns its output folder until training ends, however it ends."""

    @functools.wraps(train)
    def wrapper(self, *args, **kwargs):
        try:
            return train(self, *args, **kwargs)
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    return wrapper


class Trainer:
    """Trains one recipe. ``Trainer(config).train()`` returns the exported pipeline folder.

    Args:
        config: the recipe. Its ``train.mixed_precision`` and ``train.cpu``, when unset, come from the launcher
            (`apply_launcher_settings`); ``self.config`` holds the values used.
        trackers: experiment trackers of one's own (`accelerate.tracking.GeneralTracker` instances), used next to
            those that ``train.report_to`` names.
    """

    @_gives_up_the_output_dir_on_error
    def __init__(self, config: Config, trackers: list[GeneralTracker] | tuple[GeneralTracker, ...] = ()):
        config = apply_launcher_settings(config)
        check_environment(config)
        config = with_data_resolution(config)  # what is trained at, for every saved config and the resume check
        self.config, self.output_dir = config, Path(config.train.output_dir)
        self.accelerator = self._start_accelerator(trackers)
        # From here until train() ends, no other run writes into output_dir (held by the main process).
        self.run_lock = claim_output_dir(config, self.accelerator)
        # The checkpoint a resume will load, its files checked and compared with this config before any work.
        self.resume_from = resume_checkpoint(config, self.accelerator)
        if self.resume_from is not None:
            check_resume_config(config, self.resume_from)
        if config.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        set_seed(config.train.seed)  # model initialisation, then the training stream (restored on resume)

        self.data = load_training_data(config, self.accelerator.device)
        self.data_identity = self.data.identity()  # recorded in each checkpoint; a resume compares it
        if self.resume_from is not None:
            data_warning = check_resume_data(config, self.resume_from, self.data_identity)
            if data_warning and self.accelerator.is_main_process:
                logger.warning(data_warning)
        self.micro_batch_size = check_job(config, self.accelerator, len(self.data.dataset), self._dataset_name())
        self._build_model()
        snapshot_dir = str(self.output_dir / SNAPSHOT_DIR_NAME) if self.accelerator.is_main_process else None
        self.ema = build_ema(config, self.model, snapshot_dir)
        self._prepare_for_training()

        # Where the run stands; a checkpoint saves it (`_trainer_state`) and a resume restores it.
        self.step, self.epoch, self.batches_into_epoch, self.images_seen = 0, 0, 0, 0
        self.nonfinite = NonFiniteSteps(config.train.max_consecutive_nonfinite, self.accelerator.device)
        self.train_seconds = 0.0
        self.hardware = hardware_name(self.accelerator)
        self.latest_grid = None
        self.pusher = None
        self.push_result = None
        self.saved_step = None  # the step of the newest checkpoint this run wrote

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
        return accelerator

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
        # REPA: the block and its token grid are checked before the encoder loads and before any step.
        check_repa_fits(config, self.model, self.data.encoder_features)
        self.auxiliary_losses = build_auxiliary_losses(config, self.model, self.data)

    def _prepare_for_training(self) -> None:
        """Compile, hand the model and the optimizer to accelerate, and register what else checkpoints hold: the LR
        schedule and the EMA, each under its name (`NamedState`)."""
        config, accelerator = self.config, self.accelerator
        if config.train.compile:
            # In place rather than torch.compile(model): the parameter names, and so checkpoints, stay the same
            # with and without compilation, and a run can be resumed either way.
            self.model.compile()
        trainable = TrainingModule(
            self.model,
            self.objective,
            accelerator.process_index,
            accelerator.num_processes,
            auxiliary_losses=self.auxiliary_losses,
        )
        self.training_module = trainable  # unwrapped, to tell the auxiliary losses the step
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

    @_gives_up_the_output_dir_at_the_end
    def train(self) -> Path | None:
        """Resume when asked, train to ``train.max_steps``, then write the last checkpoint, the final grid and the
        export (and push it when asked). Returns the exported folder on the main process. The output folder is
        given up when it returns or raises."""
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
                config.train.tracker_project_name, config=tracker_config(config), init_kwargs=init_kwargs
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
        # Log lines print above the bar instead of through it; a SIGTERM stops the loop at a step boundary.
        with self.progress, logging_redirect_tqdm(), SigtermFlag(accelerator.num_processes) as self.sigterm:
            self._loop()
        # A run that ends on skipped steps or with ruined weights stops here, before its last checkpoint and export.
        self.nonfinite.check_end(self.step, self.output_dir)
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
        trained = [p for p in self.module.parameters() if p.requires_grad]  # what each update may leave non-finite
        steps_since_log, last_log_time = 0, time.perf_counter()
        while self.step < train.max_steps:
            step_start = time.perf_counter()
            micro_batches = (self.data.batch(next(batches), device) for _ in range(train.gradient_accumulation_steps))
            self.training_module.set_step(self.step)  # the restored count on resume (REPA's optional stop reads it)
            grad_norm, skipped = optimizer_step(
                accelerator, self.module, self.optimizer, micro_batches, config.optim.max_grad_norm, tracker
            )
            self.nonfinite.record(skipped)
            self.nonfinite.record_weights(trained, self.step + 1)
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
            if self.sigterm.received():
                self._stop_for_sigterm()

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
            "data": self.data_identity,
        }

    def save_checkpoint(self) -> Path:
        def write_config_and_record(folder: Path) -> None:
            (folder / CONFIG_NAME).write_text(config_to_yaml(self.config))
            self.pipeline_record().save(folder)  # what exporting this checkpoint needs, data and trainer aside

        with explain_failed_write(self.output_dir, self.step):  # a full disk, said as such, naming what is kept
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
        self.saved_step = self.step
        return path

    def _stop_for_sigterm(self) -> None:
        """Checkpoint the step reached (unless it just was, or lies in a run of non-finite steps, which no checkpoint
        may claim as good) and end the run with `TrainingPreempted`."""
        accelerator = self.accelerator
        if self.saved_step == self.step:
            outcome = f"its checkpoint was written just before, {self.output_dir / checkpoint_name(self.step)}"
        elif self.nonfinite.allow_checkpoint(self.step):
            outcome = f"saved {self.save_checkpoint()}"
        else:
            outcome = "no checkpoint, as the last steps were non-finite; the newest checkpoint stays the last good one"
        message = (
            f"SIGTERM: stopped at step {self.step} of {self.config.train.max_steps}; {outcome}. Continue with "
            "train.resume=latest."
        )
        if accelerator.is_main_process:
            logger.warning(message)
        if self.pusher is not None:
            self.pusher.close(timeout=0)  # stops retrying; a push under way is not waited for
        accelerator.end_training()
        raise TrainingPreempted(message)

    def resume(self) -> None:
        """Load the checkpoint ``train.resume`` names, if any, and continue from its step."""
        if self.config.train.resume is None:
            return
        if self.config.train.resume == "latest" and self.accelerator.is_main_process:
            for leftover in clean_incomplete_checkpoints(self.output_dir):
                logger.info("Removed incomplete checkpoint %s", leftover)
        # Chosen at set-up, when the folder was already this run's (no other run adds checkpoints to it since).
        path = self.resume_from
        if path is None:
            logger.warning(
                "train.resume=latest: no checkpoint in %s, so this run STARTS FROM SCRATCH (step 0).", self.output_dir
            )
            return
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


def resume_checkpoint(config: Config, accelerator: Accelerator) -> Path | None:
    """The checkpoint ``train.resume`` names, its files checked before anything loads (`checkpoint_damage`), or
    None for a fresh run or an output folder without checkpoints.

    ``latest`` means the newest checkpoint that works: when the newest ones are damaged, the newest sound one is
    taken, with a warning naming the damaged files and the steps that will be trained again. A checkpoint named by
    its folder is never swapped for another: its damage stops the run, naming the previous sound checkpoint.

    Raises:
        DamagedCheckpointError: naming each damaged file, and what to resume instead.
    """
    resume = config.train.resume
    if resume is None:
        return None
    if resume != "latest":
        named = Path(resume)
        damage = _damage(accelerator, named)
        if not damage:
            return named
        earlier = [path for path in list_checkpoints(named.parent) if checkpoint_step(path) < checkpoint_step(named)]
        previous = next((path for path in reversed(earlier) if not _damage(accelerator, path)), None)
        way_forward = (
            f"to resume from the previous checkpoint, set train.resume={previous}"
            if previous is not None
            else f"{named.parent} holds no earlier checkpoint that is sound"
        )
        raise DamagedCheckpointError(f"train.resume: {named} is damaged: {'; '.join(damage)}. {way_forward}.")

    output_dir = config.train.output_dir
    newest = find_latest_checkpoint(output_dir, clean=False)
    if newest is None:
        return None
    older = [path for path in list_checkpoints(output_dir) if checkpoint_step(path) < checkpoint_step(newest)]
    damaged = {}
    for candidate in [newest, *reversed(older)]:
        damage = _damage(accelerator, candidate)
        if damage:
            damaged[candidate.name] = "; ".join(damage)
            continue
        if damaged and accelerator.is_main_process:
            logger.warning(
                "train.resume=latest: damaged checkpoints (%s). RESUMING FROM %s, the newest sound one: steps %d to %d "
                "will be trained again.",
                "; ".join(f"{name}: {damage}" for name, damage in damaged.items()),
                candidate,
                checkpoint_step(candidate) + 1,
                checkpoint_step(newest),
            )
        return candidate
    listed = "; ".join(f"{name}: {damage}" for name, damage in damaged.items())
    raise DamagedCheckpointError(
        f"train.resume=latest: every checkpoint in {output_dir} is damaged ({listed}); start afresh in another "
        "train.output_dir."
    )


def _damage(accelerator: Accelerator, checkpoint_dir: Path) -> list[str]:
    """`checkpoint_damage` of a checkpoint for the Trainer, which prepares one model and one optimizer."""
    return checkpoint_damage(accelerator, checkpoint_dir, models=1, optimizers=1)
